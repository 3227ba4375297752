//! The append-only audit log on disk, with group commit.
//!
//! Layout of the log directory (by default `DATA_DIR/audit/`):
//! - `entries.jsonl`: one JSON entry per line; the line's bytes (without the newline) are the
//!   Merkle leaf. This file is the record; it is fsynced before any append is acknowledged. The
//!   log ends at the file's first NUL byte: the writer keeps [`PREALLOCATE`] bytes of zeros
//!   ahead of the last entry, so an `fdatasync` overwrites blocks that already exist and need
//!   not also write the inode (measured here: half the latency and half the CPU per sync).
//! - `hashes/level-NN`: the hashes of complete subtrees, 32 bytes each, per tree level, so
//!   proofs are served from disk; rebuilt from the entries whenever they disagree.
//! - `checkpoint`: the latest signed checkpoint; `checkpoints.log`: every checkpoint issued, as
//!   signed notes separated by form feeds (`\x0c\n`).
//! - `checkpoint.pub`: the verifier key of the checkpoint signatures.
//!
//! One writer thread appends: entries that arrive while it writes and syncs wait for the next
//! group, and every entry of a group is acknowledged after one `fdatasync`. (A separate sync
//! thread, so one group is written while the one before syncs, was tried: writing a group to
//! the page cache takes microseconds, so it gained nothing, and the writer, idle between
//! entries, was woken for nearly every one: 8,000 context switches a second at 14,000 requests
//! a second.) A failed write poisons the log:
//! every later append fails, so nothing is acknowledged unrecorded.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::merkle::{self, Hash, NodeSource};
use crate::note::{Checkpoint, NoteSigner};

/// Most entries written in one group.
const MAX_GROUP: usize = 8_192;
/// Entries waiting for the writer before appends are refused.
const QUEUE_DEPTH: usize = 65_536;
/// Zero bytes kept written ahead of the last entry of `entries.jsonl`.
pub const PREALLOCATE: u64 = 8 << 20;
/// Separates checkpoints in `checkpoints.log`.
pub const CHECKPOINT_SEPARATOR: &str = "\x0c\n";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log is unavailable")]
    Unavailable,
    #[error("audit log I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Corrupt(String),
    #[error("the audit mirror: {0}")]
    Mirror(String),
}

/// Node hashes on disk, one append-only file per level.
struct LevelFiles {
    dir: PathBuf,
    files: Vec<File>,
    /// Complete nodes per level, as written.
    counts: Vec<u64>,
}

impl LevelFiles {
    fn open(dir: &Path) -> std::io::Result<Self> {
        create_private_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            files: Vec::new(),
            counts: Vec::new(),
        })
    }

    fn file(&mut self, level: usize) -> std::io::Result<&File> {
        while self.files.len() <= level {
            let path = self.dir.join(format!("level-{:02}", self.files.len()));
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .mode(PRIVATE_FILE)
                .open(path)?;
            self.files.push(file);
            self.counts.push(0);
        }
        Ok(&self.files[level])
    }

    fn truncate_all(&mut self) -> std::io::Result<()> {
        for level in 0..64 {
            let path = self.dir.join(format!("level-{level:02}"));
            if path.exists() {
                File::options().write(true).open(&path)?.set_len(0)?;
            }
        }
        self.files.clear();
        self.counts.clear();
        Ok(())
    }
}

/// Appends leaves and keeps the right edge of the tree to form parents.
struct Tree {
    levels: LevelFiles,
    /// The hash of the last complete node of each level, if it waits for a right sibling.
    pending: Vec<Option<Hash>>,
    size: u64,
    buffers: Vec<Vec<u8>>,
}

impl Tree {
    fn push(&mut self, leaf: Hash) {
        let mut hash = leaf;
        let mut level = 0;
        loop {
            if self.buffers.len() <= level {
                self.buffers.push(Vec::new());
                self.pending.push(None);
            }
            self.buffers[level].extend_from_slice(&hash);
            match self.pending[level].take() {
                Some(left) => {
                    hash = merkle::node_hash(&left, &hash);
                    level += 1;
                }
                None => {
                    self.pending[level] = Some(hash);
                    break;
                }
            }
        }
        self.size += 1;
    }

    /// The root of the tree so far, from the pending right-edge nodes (a compact range).
    fn root(&self) -> Hash {
        let mut acc: Option<Hash> = None;
        for p in self.pending.iter().flatten() {
            acc = Some(match acc {
                None => *p,
                Some(right) => merkle::node_hash(p, &right),
            });
        }
        acc.unwrap_or_else(merkle::empty_root)
    }

    /// Writes the buffered node hashes.
    fn flush(&mut self) -> std::io::Result<()> {
        for level in 0..self.buffers.len() {
            if self.buffers[level].is_empty() {
                continue;
            }
            let bytes = std::mem::take(&mut self.buffers[level]);
            let mut file = self.levels.file(level)?;
            file.write_all(&bytes)?;
            self.levels.counts[level] += (bytes.len() / 32) as u64;
        }
        Ok(())
    }
}

/// Reads node hashes from the level files (a separate handle per file, by offset).
struct Reader {
    dir: PathBuf,
}

impl NodeSource for Reader {
    fn node(&self, level: u32, index: u64) -> std::io::Result<Hash> {
        let file = File::open(self.dir.join(format!("level-{level:02}")))?;
        let mut hash = [0u8; 32];
        file.read_exact_at(&mut hash, index * 32)?;
        Ok(hash)
    }
}

struct Job {
    entry: Vec<u8>,
    reply: oneshot::Sender<Result<u64, ()>>,
}

/// What the log has durably recorded: its size and root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    pub root: Hash,
}

struct Shared {
    head: RwLock<Head>,
    healthy: AtomicBool,
    /// Groups committed (one fdatasync each).
    groups: AtomicU64,
    latest_checkpoint: RwLock<Option<String>>,
    /// False while the mirror lacks entries the file has (its last append failed).
    mirror_ok: AtomicBool,
    /// When the writer's current step (a group, a checkpoint, the mirror's catching up) began;
    /// `None` while it waits for work.
    step_began: std::sync::Mutex<Option<Instant>>,
}

/// The audit log. Cloning shares it.
#[derive(Clone)]
pub struct AuditLog {
    jobs: SyncSender<Job>,
    shared: Arc<Shared>,
    /// Shared, not copied: every request clones the server's state, and with it the log.
    dir: Arc<Path>,
    /// Declared last, so dropped after `jobs`: the last handle dropped closes the queue, then
    /// waits for the writer's final checkpoint, so a log opened again on the same directory
    /// never meets the old writer still writing there.
    _writer: Arc<WriterThread>,
}

/// The writer thread, joined when the last handle of the log is dropped.
struct WriterThread(Option<std::thread::JoinHandle<()>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Options of a log.
#[derive(Debug, Clone)]
pub struct Options {
    /// The checkpoint origin line, e.g. `twinguard/<instance>/audit`.
    pub origin: String,
    /// How often a checkpoint is signed (when the log grew).
    pub checkpoint_every: Duration,
    /// A file the latest checkpoint is copied to as well (a witness location).
    pub witness: Option<PathBuf>,
}

/// A second durable home for the log: the database that several nodes share (see
/// `docs/audit.md`, "Several nodes"). A group is acknowledged only once the local file and the
/// mirror both hold it, so a node whose disk is lost has lost no entry of an acknowledged
/// request. The mirror holds entries `0..size`, in order, as the file records them.
pub trait Mirror: Send + Sync + 'static {
    /// How many entries of this log the mirror holds.
    fn size(&self) -> Result<u64, String>;
    /// Starts storing `lines` (each an entry as recorded, without its newline) as entries
    /// `first..`; the wait it returns blocks until they are durable there, or failed. Storing
    /// an entry that the mirror already holds, the same, is no error.
    fn append(&self, first: u64, lines: Vec<Vec<u8>>) -> MirrorWait;
    /// Stores a signed checkpoint of the first `size` entries, all of which it already holds.
    fn checkpoint(&self, size: u64, note: &str) -> Result<(), String>;
}

/// The end of a [`Mirror::append`].
pub type MirrorWait = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// The writer's side of a mirror: what it holds, and the entries it still lacks.
struct Mirrored {
    mirror: Arc<dyn Mirror>,
    /// The first entry the mirror does not hold yet.
    next: u64,
    /// Entries `next..` as recorded, waiting for the mirror.
    backlog: Vec<Vec<u8>>,
    /// The latest signed checkpoint, until the mirror has it.
    checkpoint: Option<(u64, String)>,
}

/// The recorded part of `entries.jsonl`'s bytes: everything before the first NUL (the rest is
/// space written ahead, see [`PREALLOCATE`]).
pub fn recorded(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// Calls `each` with every entry line (without its newline) in order, drops a torn last line (a
/// crash mid-write of an unacknowledged group) and cuts the file after the last whole line (the
/// writer writes zeros ahead again). One line is in memory at a time: a log of millions of
/// entries opens in the memory of one.
fn read_entries(
    path: &Path,
    mut each: impl FnMut(&[u8]) -> Result<(), AuditError>,
) -> Result<(), AuditError> {
    let Ok(file) = File::open(path) else {
        return Ok(());
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut good_len = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        let torn = line.last() != Some(&b'\n');
        if let Some(nul) = line.iter().position(|b| *b == 0) {
            // The end of the record. Pages of a group that was never acknowledged may have
            // reached the disk out of order, so whatever follows is not read.
            if nul > 0 {
                tracing::warn!(
                    bytes = nul,
                    "dropping a torn last audit entry (never acknowledged)"
                );
            }
            break;
        }
        if torn {
            tracing::warn!(
                bytes = n,
                "dropping a torn last audit entry (never acknowledged)"
            );
            break;
        }
        good_len += n as u64;
        each(&line[..n - 1])?;
    }
    let file = OpenOptions::new().write(true).open(path)?;
    if file.metadata()?.len() != good_len {
        file.set_len(good_len)?;
        file.sync_all()?;
    }
    Ok(())
}

impl AuditLog {
    /// Opens (or creates) the log in `dir`, checkpoints signed by `signer`.
    pub fn open(dir: &Path, signer: NoteSigner, options: Options) -> Result<Self, AuditError> {
        Self::open_mirrored(dir, signer, options, None)
    }

    /// [`AuditLog::open`], every group also stored in `mirror` before it is acknowledged.
    /// Entries the file holds and the mirror lacks (a crash between the two) are sent first; a
    /// mirror that holds more entries than the file is refused, since the file was rolled back
    /// or replaced (a node's log continues only from its own file).
    pub fn open_mirrored(
        dir: &Path,
        signer: NoteSigner,
        options: Options,
        mirror: Option<Arc<dyn Mirror>>,
    ) -> Result<Self, AuditError> {
        create_private_dir(dir)?;
        write_atomic(
            &dir.join("checkpoint.pub"),
            format!("{}\n", signer.verifier_key()).as_bytes(),
        )?;
        let entries_path = dir.join("entries.jsonl");
        let mut levels = LevelFiles::open(&dir.join("hashes"))?;
        levels.truncate_all()?;
        let mut tree = Tree {
            levels,
            pending: Vec::new(),
            size: 0,
            buffers: Vec::new(),
        };
        let mut catch_up = mirror.map(CatchUp::start).transpose()?;
        read_entries(&entries_path, |line| {
            if let Some(c) = catch_up.as_mut() {
                c.entry(tree.size, line)?;
            }
            tree.push(merkle::leaf_hash(line));
            if tree.buffers.first().is_some_and(|b| b.len() >= 1 << 20) {
                tree.flush()?;
            }
            Ok(())
        })?;
        tree.flush()?;
        let root = tree.root();
        let mirrored = catch_up.map(|c| c.finish(tree.size)).transpose()?;
        let latest = std::fs::read_to_string(dir.join("checkpoint")).ok();
        let shared = Arc::new(Shared {
            head: RwLock::new(Head {
                size: tree.size,
                root,
            }),
            healthy: AtomicBool::new(true),
            groups: AtomicU64::new(0),
            latest_checkpoint: RwLock::new(latest),
            mirror_ok: AtomicBool::new(true),
            step_began: std::sync::Mutex::new(None),
        });
        let entries = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .mode(PRIVATE_FILE)
            .open(&entries_path)?;
        let end = entries.metadata()?.len();
        let (jobs, rx) = mpsc::sync_channel(QUEUE_DEPTH);
        let writer = Writer {
            dir: dir.to_owned(),
            entries,
            end,
            allocated: end,
            tree,
            signer,
            options,
            shared: shared.clone(),
            checkpointed: None,
            mirrored,
        };
        let thread = std::thread::Builder::new()
            .name("twinguard-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            jobs,
            shared,
            dir: Arc::from(dir),
            _writer: Arc::new(WriterThread(Some(thread))),
        })
    }

    /// Appends an entry and returns its index once it is durable. Blocks: call it off the
    /// async threads, or use [`AuditLog::append_async`].
    pub fn append(&self, entry: Vec<u8>) -> Result<u64, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job { entry, reply })
            .map_err(|_| AuditError::Unavailable)?;
        answer
            .blocking_recv()
            .map_err(|_| AuditError::Unavailable)?
            .map_err(|_| AuditError::Unavailable)
    }

    /// [`AuditLog::append`] for async callers: waits on a oneshot, not a thread.
    pub async fn append_async(&self, entry: Vec<u8>) -> Result<u64, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job { entry, reply })
            .map_err(|_| AuditError::Unavailable)?;
        answer
            .await
            .map_err(|_| AuditError::Unavailable)?
            .map_err(|_| AuditError::Unavailable)
    }

    /// Groups committed so far, one `fdatasync` each.
    pub fn groups_committed(&self) -> u64 {
        self.shared.groups.load(Ordering::Relaxed)
    }

    /// False once a write failed (appends are refused), and while the mirror lacks entries
    /// (the appends of those groups were refused): readiness reports it.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst) && self.shared.mirror_ok.load(Ordering::SeqCst)
    }

    /// How long the writer has been at its current step (a group, a checkpoint, the mirror's
    /// catching up), while it is at one: a step that takes seconds is held (a database waiting
    /// for a synchronous standby that is gone, a disk or a link that hangs), and no request is
    /// answered meanwhile.
    pub fn busy_for(&self) -> Option<Duration> {
        self.shared
            .step_began
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|began| began.elapsed())
    }

    pub fn head(&self) -> Head {
        self.shared.head.read().map(|h| *h).unwrap_or(Head {
            size: 0,
            root: merkle::empty_root(),
        })
    }

    pub fn latest_checkpoint(&self) -> Option<String> {
        self.shared
            .latest_checkpoint
            .read()
            .ok()
            .and_then(|c| c.clone())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The inclusion proof of entry `index` in the tree of `size` entries.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        if index >= size || size > self.head().size {
            return Err(AuditError::Corrupt("index or size out of range".into()));
        }
        Ok(merkle::inclusion_proof(&self.reader(), index, size)?)
    }

    /// The consistency proof between the trees of `old` and `new` entries.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, AuditError> {
        if old > new || new > self.head().size {
            return Err(AuditError::Corrupt("sizes out of range".into()));
        }
        Ok(merkle::consistency_proof(&self.reader(), old, new)?)
    }

    /// The root of the tree of the first `size` entries.
    pub fn root_at(&self, size: u64) -> Result<Hash, AuditError> {
        if size > self.head().size {
            return Err(AuditError::Corrupt("size out of range".into()));
        }
        Ok(merkle::subtree_root(&self.reader(), 0, size)?)
    }

    /// Entry `index`, as recorded.
    pub fn entry(&self, index: u64) -> Result<Vec<u8>, AuditError> {
        if index >= self.head().size {
            return Err(AuditError::Corrupt("index out of range".into()));
        }
        let file = File::open(self.dir.join("entries.jsonl"))?;
        BufReader::new(file)
            .split(b'\n')
            .nth(index as usize)
            .ok_or_else(|| AuditError::Corrupt("entry missing".into()))?
            .map_err(AuditError::from)
    }

    fn reader(&self) -> Reader {
        Reader {
            dir: self.dir.join("hashes"),
        }
    }
}

struct Writer {
    dir: PathBuf,
    entries: File,
    /// Where the next entry goes in `entries.jsonl`, and the file's length (zeros from `end`).
    end: u64,
    allocated: u64,
    tree: Tree,
    signer: NoteSigner,
    options: Options,
    shared: Arc<Shared>,
    checkpointed: Option<(u64, Instant)>,
    mirrored: Option<Mirrored>,
}

/// What the mirror holds of the log at open, and the entries it lacks being sent as the file
/// is read (the same pass that builds the tree), a group at a time.
struct CatchUp {
    mirror: Arc<dyn Mirror>,
    held: u64,
    chunk: Vec<Vec<u8>>,
    /// Index of the first entry of `chunk`.
    first: u64,
}

impl CatchUp {
    fn start(mirror: Arc<dyn Mirror>) -> Result<Self, AuditError> {
        let held = mirror.size().map_err(mirror_error)?;
        Ok(Self {
            mirror,
            held,
            chunk: Vec::new(),
            first: held,
        })
    }

    /// Entry `index` of the file, read in order.
    fn entry(&mut self, index: u64, line: &[u8]) -> Result<(), AuditError> {
        if index >= self.held {
            self.chunk.push(line.to_vec());
            if self.chunk.len() == MAX_GROUP {
                self.send()?;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), AuditError> {
        let lines = std::mem::take(&mut self.chunk);
        let n = lines.len() as u64;
        self.mirror.append(self.first, lines)().map_err(mirror_error)?;
        self.first += n;
        Ok(())
    }

    /// The file read whole, holding `size` entries: a mirror that holds more is refused.
    fn finish(mut self, size: u64) -> Result<Mirrored, AuditError> {
        if self.held > size {
            return Err(AuditError::Corrupt(format!(
                "the audit mirror holds {} entries of this log but its file only {size}: the \
                 file was rolled back or replaced; put the log's own file back, or start the \
                 node with a new audit key (a new log)",
                self.held
            )));
        }
        if !self.chunk.is_empty() {
            self.send()?;
        }
        if size > self.held {
            tracing::info!(
                entries = size - self.held,
                "sent the audit mirror the entries it lacked"
            );
        }
        Ok(Mirrored {
            mirror: self.mirror,
            next: size,
            backlog: Vec::new(),
            checkpoint: None,
        })
    }
}

fn mirror_error(e: String) -> AuditError {
    AuditError::Mirror(e)
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_GROUP);
        let mut buffer: Vec<u8> = Vec::with_capacity(1 << 20);
        loop {
            let wait = self.options.checkpoint_every;
            self.waiting(None);
            let received = rx.recv_timeout(wait);
            // From here until the next wait for work: a group, a checkpoint, or the mirror's
            // catching up, each of which may wait for the disk or the database.
            self.waiting(Some(Instant::now()));
            match received {
                Ok(job) => batch.push(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // A mirror that failed gets what it lacks without waiting for traffic, so
                    // readiness comes back once the database does.
                    self.mirror_caught_up();
                    self.checkpoint_if_due();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.checkpoint_if_due();
                    return;
                }
            }
            while batch.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // While the mirror lacks entries, a group is refused unwritten: what the file holds
            // beyond the mirror stays one group, however many requests arrive in an outage.
            if !self.mirror_caught_up() {
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(()));
                }
                self.checkpoint_if_due();
                continue;
            }
            let committed = if self.shared.healthy.load(Ordering::SeqCst) {
                match self.write_group(&batch, &mut buffer) {
                    // The mirror stores the group while the file syncs.
                    Ok(head) => {
                        let mirroring = self.start_mirror(&buffer);
                        let synced = self.entries.sync_data().is_ok();
                        let mirrored = self.finish_mirror(mirroring);
                        synced.then_some((head, mirrored))
                    }
                    Err(_) => None,
                }
            } else {
                None
            };
            match committed {
                Some((head, mirrored)) => {
                    self.shared.groups.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut durable) = self.shared.head.write() {
                        *durable = head;
                    }
                    let first = head.size - batch.len() as u64;
                    for (i, job) in batch.drain(..).enumerate() {
                        // Recorded here but not in the mirror: refused, as a write to a
                        // file that failed would be (the entries reach the mirror later).
                        let answer = if mirrored {
                            Ok(first + i as u64)
                        } else {
                            Err(())
                        };
                        let _ = job.reply.send(answer);
                    }
                }
                None => {
                    self.shared.healthy.store(false, Ordering::SeqCst);
                    tracing::error!(
                        "the audit log cannot be written; every request is refused until it can"
                    );
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(()));
                    }
                }
            }
            self.checkpoint_if_due();
        }
    }

    /// Marks the writer as at work since `began`, or as waiting for work.
    fn waiting(&self, began: Option<Instant>) {
        *self
            .shared
            .step_began
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = began;
    }

    /// Hands the mirror what it lacks: the entries that failed to reach it before, then the
    /// group just written (`written`, lines ending in newlines). `None` without a mirror.
    fn start_mirror(&mut self, written: &[u8]) -> Option<MirrorWait> {
        let mirrored = self.mirrored.as_mut()?;
        mirrored.backlog.extend(
            written
                .split(|b| *b == b'\n')
                .filter(|line| !line.is_empty())
                .map(<[u8]>::to_vec),
        );
        Some(
            mirrored
                .mirror
                .append(mirrored.next, mirrored.backlog.clone()),
        )
    }

    /// Whether the mirror holds every entry of the file, after sending it what it lacked.
    fn mirror_caught_up(&mut self) -> bool {
        if self.mirrored.as_ref().is_none_or(|m| m.backlog.is_empty()) {
            return true;
        }
        let wait = self.start_mirror(&[]);
        self.finish_mirror(wait)
    }

    /// Whether the mirror now holds everything the file does. When it does not, the entries
    /// wait, and groups are refused unwritten until they reach it.
    fn finish_mirror(&mut self, wait: Option<MirrorWait>) -> bool {
        let (Some(wait), Some(mirrored)) = (wait, self.mirrored.as_mut()) else {
            return true;
        };
        match wait() {
            Ok(()) => {
                mirrored.next += mirrored.backlog.len() as u64;
                mirrored.backlog.clear();
                self.shared.mirror_ok.store(true, Ordering::SeqCst);
                true
            }
            Err(e) => {
                self.shared.mirror_ok.store(false, Ordering::SeqCst);
                tracing::error!(error = %e, entries = mirrored.backlog.len(), "the audit mirror cannot store entries; requests are refused until it can");
                false
            }
        }
    }

    /// Writes a group to the page cache and extends the tree; the caller makes it durable.
    fn write_group(&mut self, batch: &[Job], buffer: &mut Vec<u8>) -> Result<Head, AuditError> {
        buffer.clear();
        let mut starts = Vec::with_capacity(batch.len());
        for (i, job) in batch.iter().enumerate() {
            // Entries are JSON objects; the log puts their index first, so every line names
            // its own position and a deletion or reordering shows.
            let body = job.entry.strip_prefix(b"{").unwrap_or(&[]);
            // A NUL would end the record early (see `PREALLOCATE`); JSON escapes it anyway.
            if body.is_empty() || job.entry.iter().any(|b| *b == b'\n' || *b == 0) {
                return Err(AuditError::Corrupt(
                    "an entry must be a one-line JSON object".into(),
                ));
            }
            starts.push(buffer.len());
            buffer.extend_from_slice(format!("{{\"seq\":{}", self.tree.size + i as u64).as_bytes());
            if body != b"}" {
                buffer.push(b',');
            }
            buffer.extend_from_slice(body);
            buffer.push(b'\n');
        }
        self.reserve(buffer.len() as u64)?;
        self.entries.write_all_at(buffer, self.end)?;
        self.end += buffer.len() as u64;
        starts.push(buffer.len());
        for pair in starts.windows(2) {
            self.tree
                .push(merkle::leaf_hash(&buffer[pair[0]..pair[1] - 1]));
        }
        self.tree.flush()?;
        Ok(Head {
            size: self.tree.size,
            root: self.tree.root(),
        })
    }

    /// Makes sure `len` bytes after `end` are already part of the file, writing
    /// [`PREALLOCATE`] more zeros when they are not. The group's `fdatasync` makes them durable
    /// together with the group; every later sync then leaves the inode alone.
    fn reserve(&mut self, len: u64) -> std::io::Result<()> {
        if self.end + len <= self.allocated {
            return Ok(());
        }
        let target = self.end + len + PREALLOCATE;
        let zeros = vec![0u8; 1 << 20];
        while self.allocated < target {
            let n = (target - self.allocated).min(zeros.len() as u64) as usize;
            self.entries.write_all_at(&zeros[..n], self.allocated)?;
            self.allocated += n as u64;
        }
        Ok(())
    }

    fn checkpoint_if_due(&mut self) {
        self.sign_checkpoint_if_due();
        // The mirror gets the latest checkpoint once it holds every entry it covers.
        let Some(mirrored) = self.mirrored.as_mut() else {
            return;
        };
        if let Some((size, note)) = mirrored
            .checkpoint
            .take_if(|(size, _)| *size <= mirrored.next)
            && let Err(e) = mirrored.mirror.checkpoint(size, &note)
        {
            tracing::warn!(error = %e, size, "the audit mirror cannot store a checkpoint; it is sent again");
            mirrored.checkpoint.get_or_insert((size, note));
        }
    }

    fn sign_checkpoint_if_due(&mut self) {
        let head = match self.shared.head.read() {
            Ok(h) => *h,
            Err(_) => return,
        };
        let due = match self.checkpointed {
            None => true,
            Some((size, at)) => size != head.size && at.elapsed() >= self.options.checkpoint_every,
        };
        if !due {
            return;
        }
        let checkpoint = Checkpoint {
            origin: self.options.origin.clone(),
            size: head.size,
            root: head.root,
        };
        let note = self.signer.sign(&checkpoint.text());
        match self.write_checkpoint(&note) {
            Ok(()) => {
                self.checkpointed = Some((head.size, Instant::now()));
                if let Some(mirrored) = self.mirrored.as_mut() {
                    mirrored.checkpoint = Some((head.size, note.clone()));
                }
                if let Ok(mut latest) = self.shared.latest_checkpoint.write() {
                    *latest = Some(note);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "writing an audit checkpoint failed");
                self.shared.healthy.store(false, Ordering::SeqCst);
            }
        }
    }

    fn write_checkpoint(&self, note: &str) -> std::io::Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(PRIVATE_FILE)
            .open(self.dir.join("checkpoints.log"))?;
        log.write_all(note.as_bytes())?;
        log.write_all(CHECKPOINT_SEPARATOR.as_bytes())?;
        log.sync_data()?;
        write_atomic(&self.dir.join("checkpoint"), note.as_bytes())?;
        if let Some(witness) = &self.options.witness
            && let Err(e) = write_atomic(witness, note.as_bytes())
        {
            tracing::warn!(error = %e, path = %witness.display(), "copying the checkpoint to the witness failed");
        }
        Ok(())
    }
}

/// Every file the log creates is its owner's only, whatever the process umask.
const PRIVATE_FILE: u32 = 0o600;

/// A directory (and its missing parents) that only its owner can enter.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // `checkpoint.tmp` for `checkpoint`, `checkpoint.pub.tmp` for `checkpoint.pub`: each file
    // its own temporary name (`with_extension` gave both `checkpoint.tmp`).
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}
