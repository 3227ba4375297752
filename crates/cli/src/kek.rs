//! `twinguard kek`: rotating the key-encryption key that seals the instance's private material
//! in a shared store, while the nodes serve (`docs/storage.md`, "Rotating the key-encryption
//! key"). Three steps, because the new key must reach every node before anything is sealed
//! under it, and the old one may leave only once nothing is:
//!
//! 1. `add`: a new key at the end of this node's file; it opens, it seals nothing yet.
//! 2. `rotate`: every sealed record of the store sealed again under the newest key, in one
//!    commit. Nodes then seal under it too (they seal under the key the store's records use).
//! 3. `retire`: the keys no record uses removed from the file.
//!
//! Between the steps the operator copies the file to every node; a node reads it again by
//! itself when it meets a record under a key it does not hold yet.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use twinguard_server::datadir::DataDir;
use twinguard_server::startup::StoreConfig;
use twinguard_server::vault::{KekRing, Vault, id_text};
use twinguard_store_postgres::Hold;

/// How long the command waits for a backup or restore that holds the database.
const STORE_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Subcommand)]
pub enum KekCommand {
    /// Add a new key to this node's key-encryption key file (DATA_DIR/secrets/instance.kek).
    /// It seals nothing until `twinguard kek rotate`.
    Add,
    /// Seal every record of the store's private material again under the file's newest key,
    /// while the nodes serve. Every node's file must hold that key first.
    Rotate,
    /// Remove from this node's file the keys no record of the store is sealed under.
    Retire,
}

pub fn run(command: KekCommand, data_dir: &Path, store: &StoreConfig) -> anyhow::Result<()> {
    let data_dir = DataDir::new(data_dir);
    let file = data_dir.kek();
    anyhow::ensure!(
        matches!(store, StoreConfig::Postgres(_)),
        "the key-encryption key seals the private material of a shared store: give --store \
         postgresql://... (the embedded store keeps its keys as files in the data directory)"
    );
    anyhow::ensure!(
        file.exists(),
        "{} holds no key-encryption key: this is not a node's data directory",
        file.display()
    );
    match command {
        KekCommand::Add => {
            let id = KekRing::add_to_file(&file)?;
            println!(
                "Added key-encryption key {} to {}.",
                id_text(&id),
                file.display()
            );
            println!("It opens records from now on and seals nothing yet.");
            println!(
                "Next: copy {} to every node's data directory (mode 0600), then run",
                file.display()
            );
            println!(
                "  twinguard kek rotate --data-dir {} --store ...",
                data_dir.root().display()
            );
        }
        KekCommand::Rotate => {
            let vault = open(&data_dir, store)?;
            let done = vault.rotate_to_newest()?;
            println!(
                "Sealed {} records again under key-encryption key {} ({} were already).",
                done.records,
                id_text(&done.to),
                done.already
            );
            println!("Nodes seal under it from now on. A node whose file lacks it cannot open");
            println!("the instance's material: it keeps what it has in memory and will not start.");
            println!("Next, once every node's file holds it:");
            println!(
                "  twinguard kek retire --data-dir {} --store ...",
                data_dir.root().display()
            );
        }
        KekCommand::Retire => {
            let vault = open(&data_dir, store)?;
            let in_use = vault.keys_in_use()?;
            anyhow::ensure!(
                !in_use.is_empty(),
                "the store holds no sealed record: no key is in use, and none is removed"
            );
            let held = vault.ring().ids();
            if let Some(missing) = in_use.iter().find(|id| !held.contains(id)) {
                anyhow::bail!(
                    "the store has records sealed under key {}, which {} does not hold",
                    id_text(missing),
                    file.display()
                );
            }
            anyhow::ensure!(
                in_use.len() == 1,
                "the store's records are sealed under {} keys: run `twinguard kek rotate` \
                 first (a node created a record under the old key during the last one)",
                in_use.len()
            );
            let retired: Vec<String> = held
                .iter()
                .filter(|id| !in_use.contains(*id))
                .map(id_text)
                .collect();
            if retired.is_empty() {
                println!(
                    "Every key in {} is in use; nothing removed.",
                    file.display()
                );
                return Ok(());
            }
            KekRing::keep_in_file(&file, &in_use)?;
            println!(
                "Removed key-encryption keys {} from {}.",
                retired.join(", "),
                file.display()
            );
            println!("Copy the file to every node's data directory. The removed keys open nothing");
            println!("the store holds now; copies of the database made before the rotation still");
            println!("open under them.");
        }
    }
    Ok(())
}

/// The store's sealed records under this node's KEK file, beside nodes that keep serving.
fn open(data_dir: &DataDir, store: &StoreConfig) -> anyhow::Result<Vault> {
    let store = store
        .open_holding(data_dir, Hold::Serve, STORE_WAIT)
        .context("opening the PostgreSQL store")?;
    Vault::from_file(&data_dir.kek(), store)
}
