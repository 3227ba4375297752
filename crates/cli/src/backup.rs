//! `twinguard backup` and `twinguard restore` (control RS-6): a stopped instance's stores and
//! audit trail into one signed bundle, and a bundle that verifies into an empty store. The
//! bundle's format and its checks are the `twinguard-backup` crate's; this module finds what to
//! put in it and where it goes back. See `docs/backup.md`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use twinguard_audit::log::CHECKPOINT_SEPARATOR;
use twinguard_audit::note::{NoteSigner, NoteVerifier};
use twinguard_backup::{
    FILES, Header, Item, NODE_FILES, Part, VerifiedBundle, Writer, node_file, valid_node_name,
};
use twinguard_core::store::{
    Mutation, RESTORE_MARKER, Store, StoreError, Table, for_each_record, restore_unfinished,
};
use twinguard_server::datadir::{DataDir, Instance};
use twinguard_server::startup::StoreConfig;
use twinguard_store_postgres::{Hold, PgStore};
use twinguard_store_redb::RedbStore;

/// How long a backup or restore waits for a node to let a PostgreSQL store go: not long, since
/// both work only on a stopped instance.
const STORE_WAIT: Duration = Duration::from_secs(2);
/// Records read from a store per page.
const PAGE: usize = 1024;
/// Most mutations, and bytes of values, in one restore commit.
const BATCH_RECORDS: usize = 4096;
const BATCH_BYTES: usize = 16 << 20;

fn open_store(config: &StoreConfig, data_dir: &DataDir) -> anyhow::Result<Arc<dyn Store>> {
    config
        .open_holding(data_dir, Hold::Alone, STORE_WAIT)
        .context(
            "opening the main store (backup and restore work on a stopped instance: stop the \
         server first)",
        )
}

fn open_history(data_dir: &DataDir) -> anyhow::Result<RedbStore> {
    RedbStore::open(&data_dir.history_path()).context(
        "opening the history store (backup and restore work on a stopped instance: stop the \
         server first)",
    )
}

fn source_name(config: &StoreConfig) -> &'static str {
    match config {
        StoreConfig::Embedded => "redb",
        StoreConfig::Postgres(_) => "postgresql",
    }
}

/// `twinguard backup`: writes `out` (a new file, 0600) from the stopped instance in
/// `data_dir` and prints what it holds.
pub fn backup(data_dir: &Path, store: &StoreConfig, out: &Path) -> anyhow::Result<()> {
    let data_dir = DataDir::new(data_dir);
    let instance = data_dir.existing_instance()?.with_context(|| {
        format!(
            "{} holds no instance (no instance.json)",
            data_dir.root().display()
        )
    })?;
    ensure!(
        !data_dir.restore_marker().exists(),
        "a restore into this instance did not finish: there is nothing whole to back up"
    );
    let key_path = data_dir.root().join("secrets/audit-key");
    let key = fs::read_to_string(&key_path).with_context(|| {
        format!(
            "reading the audit key {} (the bundle is signed with it)",
            key_path.display()
        )
    })?;
    let signer = NoteSigner::from_key(&key).map_err(|e| anyhow::anyhow!("the audit key: {e}"))?;
    if matches!(store, StoreConfig::Embedded) {
        ensure!(
            data_dir.store_path().exists(),
            "{} holds no store (store.redb); for a PostgreSQL store give --store",
            data_dir.root().display()
        );
    }
    let main = open_store(store, &data_dir)?;
    ensure!(
        !restore_unfinished(main.as_ref())?,
        "a restore into this store did not finish: there is nothing whole to back up"
    );
    let history = if data_dir.history_path().exists() {
        Some(open_history(&data_dir)?)
    } else {
        None
    };
    // Every node's audit log as the database keeps it: the one place the logs of nodes whose
    // disks are gone survive (`docs/audit.md`, "Several nodes").
    let node_logs = store.audit_database()?;

    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
    let written = write_bundle(
        BufWriter::new(file),
        &data_dir,
        &instance,
        &Sources {
            config: store,
            main: main.as_ref(),
            history: history.as_ref(),
            node_logs: node_logs.as_deref(),
        },
        &signer,
    );
    let (file, counts, digest) = match written {
        Ok(done) => done,
        Err(e) => {
            // Half a bundle is no bundle.
            let _ = fs::remove_file(out);
            return Err(e);
        }
    };
    file.sync_all()?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)?.sync_all()?;
    }
    println!(
        "twinguard: backup of instance {} written to {}",
        instance.instance_id,
        out.display()
    );
    println!("  {}", counts.describe());
    println!("  sha256 {digest}");
    println!(
        "  signed with the audit key; verify it with: twinguard restore --verify-only \
         --bundle {} --key <a copy of {}/audit/checkpoint.pub kept apart>",
        out.display(),
        data_dir.root().display()
    );
    println!(
        "  not in it: the secrets/ and tls/ directories (keys, the CA, the first admin \
         credential) and event endpoints' credential files"
    );
    Ok(())
}

/// What a bundle holds, counted for people.
#[derive(Debug, Default)]
struct Counts {
    records: u64,
    twins: u64,
    relationships: u64,
    models: u64,
    identities: u64,
    devices: u64,
    history: u64,
    audit_bytes: u64,
    /// Nodes whose audit logs came from the database, and their entries.
    nodes: u64,
    node_entries: u64,
}

impl Counts {
    fn add(&mut self, part: Part, table: Table) {
        self.records += 1;
        match (part, table) {
            (Part::Main, Table::Twins) => self.twins += 1,
            (Part::Main, Table::Relationships) => self.relationships += 1,
            (Part::Main, Table::Models) => self.models += 1,
            (Part::Main, Table::Identities) => self.identities += 1,
            (Part::Main, Table::Devices) => self.devices += 1,
            // A PostgreSQL store keeps history in the main store.
            (Part::History, _) | (Part::Main, Table::History) => self.history += 1,
            _ => {}
        }
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "{} records: {} models, {} twins, {} relationships, {} identities, {} devices, \
             {} history readings; audit trail {} bytes",
            self.records,
            self.models,
            self.twins,
            self.relationships,
            self.identities,
            self.devices,
            self.history,
            self.audit_bytes
        );
        if self.nodes > 0 {
            text.push_str(&format!(
                ", with the audit logs of {} nodes from the database ({} entries)",
                self.nodes, self.node_entries
            ));
        }
        text
    }
}

/// What a bundle is read from, besides the data directory's audit trail.
struct Sources<'a> {
    config: &'a StoreConfig,
    main: &'a dyn Store,
    history: Option<&'a RedbStore>,
    /// The database that keeps the nodes' audit logs (a PostgreSQL store).
    node_logs: Option<&'a PgStore>,
}

fn write_bundle(
    out: BufWriter<File>,
    data_dir: &DataDir,
    instance: &Instance,
    sources: &Sources<'_>,
    signer: &NoteSigner,
) -> anyhow::Result<(File, Counts, String)> {
    let Sources {
        config,
        main,
        history,
        node_logs,
    } = *sources;
    let header = Header {
        format: twinguard_backup::FORMAT,
        instance_id: instance.instance_id.clone(),
        issuer: instance.issuer.clone(),
        created: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        source: source_name(config).to_owned(),
    };
    let mut writer = Writer::new(out, &header)?;
    let mut counts = Counts::default();
    // The instance's sealed material stays out: it opens only under the source nodes' key-
    // encryption key, and a restored instance makes its own (as with the embedded store's files).
    for table in Table::ALL.into_iter().filter(|t| *t != Table::Secrets) {
        for_each_record(main, table, PAGE, |key, value| -> anyhow::Result<()> {
            writer.record(Part::Main, table, &key, &value)?;
            counts.add(Part::Main, table);
            Ok(())
        })?;
    }
    if let Some(history) = history {
        for_each_record(
            history,
            Table::History,
            PAGE,
            |key, value| -> anyhow::Result<()> {
                writer.record(Part::History, Table::History, &key, &value)?;
                counts.add(Part::History, Table::History);
                Ok(())
            },
        )?;
    }
    let audit = data_dir.root().join("audit");
    for name in FILES {
        let path = audit.join(name);
        match File::open(&path) {
            // The log's entries end at the first NUL: the server writes zeros ahead of them.
            Ok(file) => counts.audit_bytes += writer.file(name, UntilNul::new(file))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    if let Some(database) = node_logs {
        write_node_logs(&mut writer, database, &mut counts)?;
    }
    let (out, digest) = writer.finish_with_digest(signer)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    Ok((file, counts, digest))
}

/// Each node's audit log in the database, as the files of a log directory that `twinguard audit
/// verify` reads (`nodes/<node>/`): its entries in index order, one per line (a gap in the
/// indexes is left for the verifier to name), its signed checkpoints, and the verifier key the
/// database names for it. Read a page at a time.
fn write_node_logs(
    writer: &mut Writer<BufWriter<File>>,
    database: &PgStore,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let mut nodes = database.audit_nodes()?;
    // In the bundle's order (bytes), whatever the database's collation.
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    for node in &nodes {
        ensure!(
            valid_node_name(&node.node),
            "the database keeps an audit log under a name no node has (twinguard_audit_nodes): \
             the database was changed by hand"
        );
        let name = node.node.as_str();
        let [entries, checkpoints, key] = NODE_FILES;
        let mut read = 0u64;
        writer.file(
            &node_file(name, entries),
            Pages::new(indexed(
                |from| database.audit_entries(name, from),
                b"\n",
                &mut read,
            )),
        )?;
        writer.file(
            &node_file(name, checkpoints),
            Pages::new(indexed(
                |from| database.audit_checkpoints(name, from),
                CHECKPOINT_SEPARATOR.as_bytes(),
                &mut 0,
            )),
        )?;
        writer.file(&node_file(name, key), node.verifier_key.as_bytes())?;
        counts.nodes += 1;
        counts.node_entries += read;
    }
    Ok(())
}

/// The pages of records stored under increasing indexes, for [`Pages`]: `fetch(from)` answers
/// the records from index `from` on, a page of them, none after the last; each record is
/// followed by `end`. `read` counts the records.
fn indexed<'a, L: AsRef<[u8]>>(
    mut fetch: impl FnMut(u64) -> Result<Vec<(u64, L)>, StoreError> + 'a,
    end: &'static [u8],
    read: &'a mut u64,
) -> impl FnMut() -> Result<Option<Vec<u8>>, StoreError> + 'a {
    let mut from = 0u64;
    move || {
        let page = fetch(from)?;
        let Some(&(last, _)) = page.last() else {
            return Ok(None);
        };
        from = last + 1;
        *read += page.len() as u64;
        let mut bytes = Vec::new();
        for (_, record) in page {
            bytes.extend_from_slice(record.as_ref());
            bytes.extend_from_slice(end);
        }
        Ok(Some(bytes))
    }
}

/// A file read a page at a time: `next` gives the next page's bytes, `None` after the last.
struct Pages<F> {
    next: F,
    page: Vec<u8>,
    at: usize,
    done: bool,
}

impl<F> Pages<F> {
    fn new(next: F) -> Self {
        Self {
            next,
            page: Vec::new(),
            at: 0,
            done: false,
        }
    }
}

impl<F: FnMut() -> Result<Option<Vec<u8>>, StoreError>> Read for Pages<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.page.len() {
            if self.done {
                return Ok(0);
            }
            match (self.next)().map_err(|e| io::Error::other(e.0))? {
                Some(page) => (self.page, self.at) = (page, 0),
                None => self.done = true,
            }
        }
        let n = buf.len().min(self.page.len() - self.at);
        buf[..n].copy_from_slice(&self.page[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The bytes of `inner` before its first NUL.
struct UntilNul<R> {
    inner: R,
    done: bool,
}

impl<R> UntilNul<R> {
    fn new(inner: R) -> Self {
        Self { inner, done: false }
    }
}

impl<R: Read> Read for UntilNul<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        match buf[..n].iter().position(|b| *b == 0) {
            Some(nul) => {
                self.done = true;
                Ok(nul)
            }
            None => Ok(n),
        }
    }
}

/// `twinguard restore`.
pub fn restore(
    bundle: &Path,
    key: &Path,
    data_dir: Option<&Path>,
    store: &StoreConfig,
) -> anyhow::Result<()> {
    let key_text = fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let verifier =
        NoteVerifier::parse(&key_text).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let input = File::open(bundle).with_context(|| format!("opening {}", bundle.display()))?;
    // Everything is checked before anything is written: the bundle is read whole into an
    // unnamed file of this process's own, and only that verified copy is restored.
    let verified = VerifiedBundle::verify(input, &verifier, &std::env::temp_dir())
        .with_context(|| format!("{} was refused", bundle.display()))?;
    let summary = verified.summary().clone();
    println!(
        "twinguard: {} verified: a backup of instance {} taken {} from {}, {} records, sha256 {}",
        bundle.display(),
        summary.header.instance_id,
        summary.header.created,
        summary.header.source,
        summary.records,
        summary.sha256
    );
    let Some(data_dir) = data_dir else {
        return Ok(());
    };
    let data_dir = DataDir::new(data_dir);
    let archive = prepare_target(&data_dir, store, &summary)?;
    let counts = apply(verified, &data_dir, store, &archive, &summary.sha256)?;
    println!("twinguard: restored into {}", data_dir.root().display());
    println!("  {}", counts.describe());
    println!(
        "  the instance's audit trail up to the backup is in {}; check it with: twinguard \
         audit verify --log {} --key {}",
        archive.display(),
        archive.display(),
        key.display()
    );
    let mut nodes: Vec<&str> = summary
        .files
        .iter()
        .filter_map(|(name, _)| name.strip_prefix("nodes/")?.split('/').next())
        .collect();
    nodes.dedup();
    if !nodes.is_empty() {
        println!(
            "  the audit logs of {} nodes, as the source database kept them, are in {}/nodes/; \
             check each with: twinguard audit verify --log {}/nodes/<node> --key <that node's \
             audit/checkpoint.pub, kept apart>",
            nodes.len(),
            archive.display(),
            archive.display()
        );
        println!("  nodes: {}", nodes.join(", "));
    }
    println!(
        "  identities, credentials and revocations are as they were at the backup: re-apply \
         any revocation, disabled identity or reset made since, before serving"
    );
    println!(
        "  next: twinguard serve --data-dir {} (sign in with a credential of the instance); \
         keep a copy of its audit/checkpoint.pub apart",
        data_dir.root().display()
    );
    Ok(())
}

/// Checks the target is this instance's or new, and empty; makes the data directory ready.
/// Returns the directory the audit trail goes to.
fn prepare_target(
    data_dir: &DataDir,
    config: &StoreConfig,
    summary: &twinguard_backup::Summary,
) -> anyhow::Result<PathBuf> {
    let header = &summary.header;
    ensure!(
        !data_dir.restore_marker().exists(),
        "a restore into {} did not finish before: restore into a new data directory and an \
         empty store",
        data_dir.root().display()
    );
    let existing = data_dir.existing_instance()?;
    if let Some(existing) = &existing {
        ensure!(
            existing.instance_id == header.instance_id,
            "{} belongs to instance {}, the bundle to {}: restore into a new data directory",
            data_dir.root().display(),
            existing.instance_id,
            header.instance_id
        );
    }
    // Refused before anything is written: a store that is not empty must not be left beside
    // a data directory that now names the bundle's instance.
    if !matches!(config, StoreConfig::Embedded) || data_dir.store_path().exists() {
        check_empty(open_store(config, data_dir)?.as_ref())?;
    }
    // Nor beside the audit logs of nodes that served the database before: `audit verify-nodes`
    // would check them as this instance's, and they would ride in its next backup.
    if let Some(audit) = config.audit_database()? {
        let nodes = audit.audit_nodes()?;
        ensure!(
            nodes.is_empty(),
            "the database holds the audit log of {} that served it before (node {} first): \
             restore only into an empty database (`twinguard backup` of the old instance \
             carries those logs)",
            match nodes.len() {
                1 => "1 node".to_owned(),
                n => format!("{n} nodes"),
            },
            nodes[0].node
        );
    }
    if data_dir.history_path().exists() {
        check_history_empty(&open_history(data_dir)?, data_dir)?;
    }
    if existing.is_none() {
        data_dir.adopt_instance(&Instance {
            version: 1,
            instance_id: header.instance_id.clone(),
            issuer: header.issuer.clone(),
        })?;
    }
    // Keys and certificates of the target's own (kept if the operator brought them back).
    data_dir.prepare(&[])?;
    let name: String = header
        .created
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let archive = data_dir
        .private_dir("audit-archive")?
        .join(format!("{name}-{}", &summary.sha256[..12]));
    Ok(archive)
}

fn apply(
    verified: VerifiedBundle,
    data_dir: &DataDir,
    config: &StoreConfig,
    archive: &Path,
    sha256: &str,
) -> anyhow::Result<Counts> {
    let main = open_store(config, data_dir)?;
    check_empty(main.as_ref())?;
    let history = open_history(data_dir)?;
    check_history_empty(&history, data_dir)?;

    ensure!(
        !archive.exists(),
        "{} exists: this bundle was restored here before",
        archive.display()
    );

    // The markers go first: should the restore stop half-way, neither the data directory nor
    // the store can be served.
    write_new(&data_dir.restore_marker(), sha256.as_bytes())?;
    sync_dir(data_dir.root())?;
    let mut main_batch = Batch::new(main.as_ref());
    main_batch.push(Mutation::put(
        Table::Meta,
        RESTORE_MARKER,
        sha256.as_bytes().to_vec(),
    ))?;
    main_batch.flush()?;
    let mut history_batch = Batch::new(&history);
    fs::DirBuilder::new().mode(0o700).create(archive)?;
    let mut counts = Counts::default();
    let mut file: Option<(String, File)> = None;
    // Directories made in the archive (the nodes' logs), synced at the end.
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut items = verified.items()?;
    while let Some(item) = items.next_item()? {
        match item {
            Item::Record {
                part,
                table,
                key,
                value,
            } => {
                if table == Table::Meta && key == RESTORE_MARKER {
                    bail!("the bundle holds a restore marker: it is not a backup of a whole store");
                }
                // Store positions count the commits of one database; the restored one counts
                // afresh, so the old key is not kept and positions handed out before do not
                // open on it (a new key is made at the first start).
                if table == Table::Meta && key == twinguard_server::positions::KEY_RECORD {
                    continue;
                }
                counts.add(part, table);
                let mutation = Mutation::put(table, key, value);
                match part {
                    Part::Main => main_batch.push(mutation)?,
                    Part::History => history_batch.push(mutation)?,
                }
            }
            Item::Chunk { file: name, bytes } => {
                if file.as_ref().is_none_or(|(open, _)| *open != name) {
                    if let Some((_, done)) = file.take() {
                        done.sync_all()?;
                    }
                    // The reader let through only the trail's own files and `nodes/<node>/...`
                    // with a node name of letters and digits: never a path out of the archive.
                    let path = archive.join(&name);
                    if let Some(dir) = path.parent().filter(|dir| *dir != archive)
                        && !dir.exists()
                    {
                        fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o700)
                            .create(dir)?;
                        dirs.push(dir.to_owned());
                    }
                    let created = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    file = Some((name, created));
                }
                if let Some((_, open)) = file.as_mut() {
                    open.write_all(&bytes)?;
                }
                counts.audit_bytes += bytes.len() as u64;
            }
        }
    }
    if let Some((_, done)) = file.take() {
        done.sync_all()?;
    }
    for dir in &dirs {
        sync_dir(dir)?;
    }
    if !dirs.is_empty() {
        sync_dir(&archive.join("nodes"))?;
    }
    sync_dir(archive)?;
    history_batch.flush()?;
    main_batch.push(Mutation::delete(Table::Meta, RESTORE_MARKER))?;
    main_batch.flush()?;
    fs::remove_file(data_dir.restore_marker())?;
    sync_dir(data_dir.root())?;
    Ok(counts)
}

fn check_empty(main: &dyn Store) -> anyhow::Result<()> {
    for table in Table::ALL {
        ensure!(
            main.range_from(table, "", 1)?.is_empty(),
            "the main store is not empty (its {} table has records): restore only into an \
             empty store",
            table.name()
        );
    }
    Ok(())
}

fn check_history_empty(history: &RedbStore, data_dir: &DataDir) -> anyhow::Result<()> {
    ensure!(
        history.range_from(Table::History, "", 1)?.is_empty(),
        "the history store {} is not empty: restore only into an empty one",
        data_dir.history_path().display()
    );
    Ok(())
}

/// Mutations committed a bounded batch at a time.
struct Batch<'s> {
    store: &'s dyn Store,
    mutations: Vec<Mutation>,
    bytes: usize,
}

impl<'s> Batch<'s> {
    fn new(store: &'s dyn Store) -> Self {
        Self {
            store,
            mutations: Vec::new(),
            bytes: 0,
        }
    }

    fn push(&mut self, mutation: Mutation) -> anyhow::Result<()> {
        self.bytes += mutation.key.len() + mutation.value.as_ref().map_or(0, Vec::len);
        self.mutations.push(mutation);
        if self.mutations.len() >= BATCH_RECORDS || self.bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if !self.mutations.is_empty() {
            self.store.commit(&self.mutations)?;
            self.mutations.clear();
            self.bytes = 0;
        }
        Ok(())
    }
}

fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn sync_dir(path: &Path) -> anyhow::Result<()> {
    File::open(path)?.sync_all()?;
    Ok(())
}
