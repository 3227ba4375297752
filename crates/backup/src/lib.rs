//! The backup bundle (control RS-6): every record of an instance's stores and its audit trail in
//! one file, signed with the instance's audit checkpoint key, and read back only once that
//! signature verifies with a key the operator kept apart.
//!
//! The format is a stream, so a bundle of any size is written and verified in the memory of one
//! record:
//!
//! ```text
//! "twinguard-backup 1\n"
//! 'H' u32 len  JSON header (instance, issuer, created, source store)
//! 'R' u8 part  u8 len table name  u32 len key  u32 len value     a record, in key order
//! 'F' u8 len file name  u32 len bytes                              a chunk of an audit file
//! 'E' u32 len  signed note                                         the end
//! ```
//!
//! Integers are big-endian. The signed note names the instance, the counts, and the SHA-256 of
//! every byte before the `'E'`; nothing may follow it. A reader refuses, before anything is
//! restored, a bundle whose note does not verify or does not match what it read, and a bundle
//! that breaks the format's rules: a record out of key order or repeated, a table it does not
//! know, a file not on [`FILES`] nor a node's ([`node_file`]) or in pieces, a length past its
//! limit. The order rule makes the
//! bundle of a given store one sequence of bytes: nothing in it can be repeated or shadowed.
//!
//! The note's first line, `twinguard-backup 1`, cannot begin an audit checkpoint (whose first
//! line is the origin `twinguard/<instance>/audit`), so the one key signs both without either
//! passing for the other.

use std::io::{self, BufReader, Read, Seek, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use twinguard_audit::note::{NoteSigner, NoteVerifier};
use twinguard_core::store::Table;

/// The first bytes of every bundle.
pub const MAGIC: &[u8] = b"twinguard-backup 1\n";
/// The format version in the header and the note.
pub const FORMAT: u32 = 1;
/// The audit trail's files a bundle may carry, in this order (`DATA_DIR/audit/...`).
pub const FILES: [&str; 4] = [
    "entries.jsonl",
    "checkpoints.log",
    "checkpoint",
    "checkpoint.pub",
];

/// The files of one node's audit log as the database keeps it (a PostgreSQL instance's nodes,
/// `docs/audit.md`), in this order, under `nodes/<node>/` ([`node_file`]): after [`FILES`],
/// by node name.
pub const NODE_FILES: [&str; 3] = ["entries.jsonl", "checkpoints.log", "checkpoint.pub"];
/// The longest node name a bundle carries (the server's names are 16 hex digits).
const MAX_NODE_NAME: usize = 64;

const MAX_HEADER: u32 = 64 * 1024;
const MAX_KEY: u32 = 64 * 1024;
/// Larger than any record the server writes (a model is at most 1 MiB).
const MAX_VALUE: u32 = 64 << 20;
const MAX_CHUNK: u32 = 1 << 20;
const MAX_NOTE: u32 = 16 * 1024;

/// What the bundle is of. Written first; the note repeats the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Header {
    pub format: u32,
    /// The instance ID (`DATA_DIR/instance.json`).
    pub instance_id: String,
    /// The token issuer of the instance.
    pub issuer: String,
    /// When the backup was taken (RFC 3339).
    pub created: String,
    /// The main store it was taken from: `redb` or `postgresql`.
    pub source: String,
}

/// Which store a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// The main store (`store.redb` or PostgreSQL): every table.
    Main,
    /// The history store (`history.redb`): [`Table::History`] only.
    History,
}

impl Part {
    fn byte(self) -> u8 {
        match self {
            Self::Main => 0,
            Self::History => 1,
        }
    }
}

/// One thing a bundle holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Record {
        part: Part,
        table: Table,
        key: String,
        value: Vec<u8>,
    },
    /// The next piece of one of [`FILES`] or of a node's log ([`node_file`]), named by its
    /// path in the archive; a file's pieces are consecutive.
    Chunk { file: String, bytes: Vec<u8> },
}

/// What a verified bundle held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub header: Header,
    pub records: u64,
    /// Each file carried, with its length.
    pub files: Vec<(String, u64)>,
    /// The SHA-256 of the whole bundle file, as hex: its name in logs and markers.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    #[error("reading or writing the bundle: {0}")]
    Io(#[from] io::Error),
    /// The bytes break the format: cut short, out of order, past a limit.
    #[error("the bundle is malformed: {0}")]
    Malformed(String),
    /// The note is not signed by the given key, or does not match the bundle's contents.
    #[error("the bundle does not verify: {0}")]
    NotVerified(String),
    /// The writer was asked for something the format does not allow.
    #[error("cannot write the bundle: {0}")]
    Writer(String),
}

fn malformed(message: impl Into<String>) -> BackupError {
    BackupError::Malformed(message.into())
}

/// The text the bundle's note signs.
fn note_text(instance: &str, records: u64, files: u64, bytes: u64, digest: &[u8]) -> String {
    format!(
        "twinguard-backup {FORMAT}\ninstance {instance}\nrecords {records}\nfiles {files}\nbytes {bytes}\nsha256 {}\n",
        STANDARD.encode(digest)
    )
}

fn table_index(table: Table) -> usize {
    Table::ALL
        .iter()
        .position(|t| *t == table)
        .unwrap_or(usize::MAX)
}

/// Where a record sorts in a bundle: part, then table in [`Table::ALL`]'s order, then key.
type Position = (u8, usize, String);

/// Where a file sorts in a bundle: the trail's own ([`FILES`], node `""`) first, then each
/// node's by name; within each, in the list's order.
type FileOrder = (String, usize);

/// Whether `node` is a name a bundle carries a log under: 1 to 64 lower-case letters and digits
/// (so it is one path component, and sorts the same as bytes and as text).
pub fn valid_node_name(node: &str) -> bool {
    (1..=MAX_NODE_NAME).contains(&node.len())
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The name in a bundle, and the path in the archive, of one of [`NODE_FILES`] of `node`'s log.
pub fn node_file(node: &str, file: &str) -> String {
    format!("nodes/{node}/{file}")
}

/// Where the file `name` sorts, if a bundle may hold it.
fn file_order(name: &str) -> Option<FileOrder> {
    if let Some(index) = FILES.iter().position(|f| *f == name) {
        return Some((String::new(), index));
    }
    let (node, file) = name.strip_prefix("nodes/")?.split_once('/')?;
    let index = NODE_FILES.iter().position(|f| *f == file)?;
    valid_node_name(node).then(|| (node.to_owned(), index))
}

/// Counts and hashes every byte that passes.
struct Hashing<T> {
    inner: T,
    hash: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Writes a bundle. Records must come in [`Part`], [`Table::ALL`] and key order (as the stores
/// scan them), then the files in [`FILES`]' order.
pub struct Writer<W: Write> {
    out: Hashing<W>,
    instance: String,
    last: Option<Position>,
    last_file: Option<FileOrder>,
    records: u64,
    files: u64,
}

impl<W: Write> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("records", &self.records)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, header: &Header) -> Result<Self, BackupError> {
        let json = serde_json::to_vec(header).map_err(|e| BackupError::Writer(e.to_string()))?;
        let len = checked_len(json.len(), MAX_HEADER, "the header")?;
        let mut out = Hashing::new(out);
        out.write_all(MAGIC)?;
        out.write_all(b"H")?;
        out.write_all(&len.to_be_bytes())?;
        out.write_all(&json)?;
        Ok(Self {
            out,
            instance: header.instance_id.clone(),
            last: None,
            last_file: None,
            records: 0,
            files: 0,
        })
    }

    pub fn record(
        &mut self,
        part: Part,
        table: Table,
        key: &str,
        value: &[u8],
    ) -> Result<(), BackupError> {
        if table == Table::Secrets {
            return Err(BackupError::Writer(
                "the sealed instance material stays out of bundles".into(),
            ));
        }
        if part == Part::History && table != Table::History {
            return Err(BackupError::Writer(format!(
                "the history store holds no {} records",
                table.name()
            )));
        }
        if self.last_file.is_some() {
            return Err(BackupError::Writer("a record after the files".into()));
        }
        let position = (part.byte(), table_index(table), key.to_owned());
        if self.last.as_ref().is_some_and(|last| *last >= position) {
            return Err(BackupError::Writer(format!(
                "a {} record out of key order",
                table.name()
            )));
        }
        let name = table.name().as_bytes();
        let key_len = checked_len(key.len(), MAX_KEY, "a key")?;
        let value_len = checked_len(value.len(), MAX_VALUE, "a value")?;
        self.out.write_all(&[b'R', part.byte(), name.len() as u8])?;
        self.out.write_all(name)?;
        self.out.write_all(&key_len.to_be_bytes())?;
        self.out.write_all(key.as_bytes())?;
        self.out.write_all(&value_len.to_be_bytes())?;
        self.out.write_all(value)?;
        self.last = Some(position);
        self.records += 1;
        Ok(())
    }

    /// Adds one of [`FILES`], or of a node's log ([`node_file`]), from `content`, in chunks:
    /// in their order, any of them left out. Returns its length.
    pub fn file(&mut self, name: &str, mut content: impl Read) -> Result<u64, BackupError> {
        let order = file_order(name)
            .filter(|order| self.last_file.as_ref().is_none_or(|last| last < order))
            .ok_or_else(|| {
                BackupError::Writer(format!("{name} is not a file a bundle holds here"))
            })?;
        // Full chunks, then one shorter (perhaps empty) that ends the file.
        let mut buf = vec![0u8; MAX_CHUNK as usize];
        let mut total = 0u64;
        loop {
            let n = read_full(&mut content, &mut buf)?;
            self.out.write_all(&[b'F', name.len() as u8])?;
            self.out.write_all(name.as_bytes())?;
            self.out.write_all(&(n as u32).to_be_bytes())?;
            self.out.write_all(&buf[..n])?;
            total += n as u64;
            if n < buf.len() {
                break;
            }
        }
        self.last_file = Some(order);
        self.files += 1;
        Ok(total)
    }

    /// Signs what was written and ends the bundle; returns the output, flushed.
    pub fn finish(self, signer: &NoteSigner) -> Result<W, BackupError> {
        self.finish_with_digest(signer).map(|(out, _)| out)
    }

    /// [`Writer::finish`], with the SHA-256 of the whole bundle as hex ([`Summary::sha256`]).
    pub fn finish_with_digest(mut self, signer: &NoteSigner) -> Result<(W, String), BackupError> {
        let digest = self.out.hash.clone().finalize();
        let text = note_text(
            &self.instance,
            self.records,
            self.files,
            self.out.bytes,
            &digest,
        );
        let note = signer.sign(&text);
        let len = checked_len(note.len(), MAX_NOTE, "the note")?;
        self.out.write_all(b"E")?;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(note.as_bytes())?;
        self.out.flush()?;
        let whole = hex::encode(self.out.hash.finalize());
        Ok((self.out.inner, whole))
    }
}

fn checked_len(len: usize, max: u32, what: &str) -> Result<u32, BackupError> {
    u32::try_from(len)
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| BackupError::Writer(format!("{what} is longer than {max} bytes")))
}

/// Reads until `buf` is full or the input ends.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads a bundle, checking the format as it goes and the signature at the end:
/// [`Reader::next_item`] returns `None` only after the note verified. Items returned before
/// that are not yet verified; [`verify`] reads a whole bundle first, and [`VerifiedBundle`]
/// gives items only from a copy that verified.
pub struct Reader<R: Read> {
    input: Hashing<BufReader<R>>,
    verifier: NoteVerifier,
    header: Header,
    last: Option<Position>,
    /// The file being read (or last read), and whether its last piece was full (so more of it
    /// must follow).
    file: Option<FileOrder>,
    file_open: bool,
    records: u64,
    files: Vec<(String, u64)>,
    whole: Option<Sha256>,
    done: bool,
}

impl<R: Read> std::fmt::Debug for Reader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Reader<R> {
    /// Reads the magic and the header.
    pub fn open(input: R, verifier: &NoteVerifier) -> Result<Self, BackupError> {
        let mut input = Hashing::new(BufReader::new(input));
        let mut magic = [0u8; MAGIC.len()];
        read_exact(&mut input, &mut magic)?;
        if magic != MAGIC {
            return Err(malformed("not a twinguard backup bundle"));
        }
        if read_u8(&mut input)? != b'H' {
            return Err(malformed("no header"));
        }
        let json = read_bytes(&mut input, MAX_HEADER, "the header")?;
        let header: Header =
            serde_json::from_slice(&json).map_err(|_| malformed("the header is not valid"))?;
        // One header, one text: the bytes must be those this crate writes for it.
        if serde_json::to_vec(&header).ok().as_deref() != Some(json.as_slice()) {
            return Err(malformed("the header is not in its canonical form"));
        }
        if header.format != FORMAT {
            return Err(malformed(format!("format {} is not known", header.format)));
        }
        Ok(Self {
            input,
            verifier: verifier.clone(),
            header,
            last: None,
            file: None,
            file_open: false,
            records: 0,
            files: Vec::new(),
            whole: None,
            done: false,
        })
    }

    /// The header, as the bundle states it (verified once [`Reader::next_item`] returned
    /// `None`).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next record or file piece; `None` at the end, once the signature verified.
    pub fn next_item(&mut self) -> Result<Option<Item>, BackupError> {
        if self.done {
            return Ok(None);
        }
        let (signed, bytes) = (self.input.hash.clone(), self.input.bytes);
        match read_u8(&mut self.input)? {
            b'R' => self.record().map(Some),
            b'F' => self.chunk().map(Some),
            b'E' => {
                self.end(signed, bytes)?;
                Ok(None)
            }
            _ => Err(malformed("an unknown frame")),
        }
    }

    fn record(&mut self) -> Result<Item, BackupError> {
        if self.file.is_some() {
            return Err(malformed("a record after the files"));
        }
        let part = match read_u8(&mut self.input)? {
            0 => Part::Main,
            1 => Part::History,
            _ => return Err(malformed("an unknown store")),
        };
        let name = read_name(&mut self.input)?;
        let table = Table::ALL
            .into_iter()
            .find(|t| t.name().as_bytes() == name.as_slice())
            .ok_or_else(|| malformed("a table that is not known"))?;
        // A bundle never carries the instance's sealed material (it opens only under the
        // source nodes' key-encryption key): one that does was not written by twinguard.
        if table == Table::Secrets {
            return Err(malformed("a record of the sealed instance material"));
        }
        if part == Part::History && table != Table::History {
            return Err(malformed("a history-store record of another table"));
        }
        let key = read_bytes(&mut self.input, MAX_KEY, "a key")?;
        let key = String::from_utf8(key).map_err(|_| malformed("a key is not UTF-8"))?;
        let value = read_bytes(&mut self.input, MAX_VALUE, "a value")?;
        let position = (part.byte(), table_index(table), key);
        if self.last.as_ref().is_some_and(|last| *last >= position) {
            return Err(malformed(format!(
                "a {} record is out of key order or repeated",
                table.name()
            )));
        }
        let key = position.2.clone();
        self.last = Some(position);
        self.records += 1;
        Ok(Item::Record {
            part,
            table,
            key,
            value,
        })
    }

    fn chunk(&mut self) -> Result<Item, BackupError> {
        let name = String::from_utf8(read_name(&mut self.input)?)
            .map_err(|_| malformed("a file that a bundle does not hold"))?;
        let order =
            file_order(&name).ok_or_else(|| malformed("a file that a bundle does not hold"))?;
        let bytes = read_bytes(&mut self.input, MAX_CHUNK, "a file piece")?;
        match &self.file {
            Some(current) if *current == order && self.file_open => {}
            _ if self.file_open => return Err(malformed("a file is cut short")),
            Some(last) if *last >= order => {
                return Err(malformed("a file is in pieces or out of order"));
            }
            _ => {
                self.file = Some(order);
                self.files.push((name.clone(), 0));
            }
        }
        // Only a full piece is followed by more of the same file.
        self.file_open = bytes.len() == MAX_CHUNK as usize;
        if let Some((_, len)) = self.files.last_mut() {
            *len += bytes.len() as u64;
        }
        Ok(Item::Chunk { file: name, bytes })
    }

    /// `signed`: the hash of every byte before the `'E'`, and their count.
    fn end(&mut self, signed: Sha256, bytes: u64) -> Result<(), BackupError> {
        if self.file_open {
            return Err(malformed("a file is cut short"));
        }
        let note = read_bytes(&mut self.input, MAX_NOTE, "the note")?;
        let note = String::from_utf8(note).map_err(|_| malformed("the note is not text"))?;
        let mut rest = [0u8; 1];
        if read_full(&mut self.input, &mut rest)? != 0 {
            return Err(malformed("bytes after the end"));
        }
        let text = self
            .verifier
            .verify(&note)
            .map_err(|e| BackupError::NotVerified(format!("the signature: {e}")))?;
        let expected = note_text(
            &self.header.instance_id,
            self.records,
            self.files.len() as u64,
            bytes,
            &signed.finalize(),
        );
        if text != expected {
            return Err(BackupError::NotVerified(
                "the signed summary does not match the contents".into(),
            ));
        }
        self.whole = Some(self.input.hash.clone());
        self.done = true;
        Ok(())
    }

    /// The summary, once [`Reader::next_item`] returned `None`.
    pub fn summary(&self) -> Option<Summary> {
        let whole = self.whole.clone()?;
        Some(Summary {
            header: self.header.clone(),
            records: self.records,
            files: self.files.clone(),
            sha256: hex::encode(whole.finalize()),
        })
    }
}

fn eof_is_malformed(e: io::Error) -> BackupError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        malformed("the bundle ends early")
    } else {
        BackupError::Io(e)
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<(), BackupError> {
    input.read_exact(buf).map_err(eof_is_malformed)
}

fn read_u8(input: &mut impl Read) -> Result<u8, BackupError> {
    let mut byte = [0u8; 1];
    read_exact(input, &mut byte)?;
    Ok(byte[0])
}

/// A table or file name: a length byte and that many bytes.
fn read_name(input: &mut impl Read) -> Result<Vec<u8>, BackupError> {
    let mut name = vec![0u8; usize::from(read_u8(input)?)];
    read_exact(input, &mut name)?;
    Ok(name)
}

/// A length (u32 BE, at most `max`) and that many bytes. The buffer grows with the bytes that
/// arrive, not with the length a bundle claims.
fn read_bytes(input: &mut impl Read, max: u32, what: &str) -> Result<Vec<u8>, BackupError> {
    let mut len = [0u8; 4];
    read_exact(input, &mut len)?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(malformed(format!("{what} is longer than {max} bytes")));
    }
    let mut bytes = Vec::new();
    input.take(u64::from(len)).read_to_end(&mut bytes)?;
    if bytes.len() != len as usize {
        return Err(malformed("the bundle ends early"));
    }
    Ok(bytes)
}

/// Reads a whole bundle and verifies it, copying every byte read to `copy`: nothing the
/// bundle holds is acted on before this returns `Ok`.
pub fn verify(
    input: impl Read,
    verifier: &NoteVerifier,
    copy: impl Write,
) -> Result<Summary, BackupError> {
    let mut reader = Reader::open(Tee { input, copy }, verifier)?;
    while reader.next_item()?.is_some() {}
    reader.input.inner.get_mut().copy.flush()?;
    reader
        .summary()
        .ok_or_else(|| malformed("the bundle has no end"))
}

/// Passes what it reads to a copy.
struct Tee<R, W> {
    input: R,
    copy: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// A bundle that verified, held in an unnamed temporary file of this process's own, so what is
/// restored is exactly what verified, whatever happens to the bundle's file meanwhile.
#[derive(Debug)]
pub struct VerifiedBundle {
    copy: std::fs::File,
    verifier: NoteVerifier,
    summary: Summary,
}

impl VerifiedBundle {
    /// Verifies `input` into an unnamed temporary file in `temp_dir`.
    pub fn verify(
        input: impl Read,
        verifier: &NoteVerifier,
        temp_dir: &std::path::Path,
    ) -> Result<Self, BackupError> {
        let mut copy = tempfile::tempfile_in(temp_dir)?;
        let summary = verify(input, verifier, io::BufWriter::new(&mut copy))?;
        Ok(Self {
            copy,
            verifier: verifier.clone(),
            summary,
        })
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The bundle's items from the verified copy (checked again as they are read).
    pub fn items(mut self) -> Result<Reader<std::fs::File>, BackupError> {
        self.copy.rewind()?;
        Reader::open(self.copy, &self.verifier)
    }
}

/// Bundles made by hand, for tests and the fuzz target: what a holder of the key could write.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;

    /// `frames` after `header`, ended by a note of `signer` that matches them (the counts
    /// taken from a best-effort reading of the frames, so a well-formed bundle verifies).
    pub fn sign_frames(header: &Header, frames: &[u8], signer: &NoteSigner) -> Vec<u8> {
        let (records, files) = count_frames(frames);
        sign_frames_counted(header, frames, signer, records, files)
    }

    /// [`sign_frames`] with the counts the note states.
    pub fn sign_frames_counted(
        header: &Header,
        frames: &[u8],
        signer: &NoteSigner,
        records: u64,
        files: u64,
    ) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        let json = serde_json::to_vec(header).unwrap_or_default();
        bytes.push(b'H');
        bytes.extend_from_slice(&(json.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&json);
        bytes.extend_from_slice(frames);
        let text = note_text(
            &header.instance_id,
            records,
            files,
            bytes.len() as u64,
            &Sha256::digest(&bytes),
        );
        let note = signer.sign(&text);
        bytes.push(b'E');
        bytes.extend_from_slice(&(note.len() as u32).to_be_bytes());
        bytes.extend_from_slice(note.as_bytes());
        bytes
    }

    /// Records and distinct files in `frames`, read loosely (stops at the first bad frame).
    fn count_frames(mut frames: &[u8]) -> (u64, u64) {
        let (mut records, mut files) = (0, 0);
        let mut last_file: Option<Vec<u8>> = None;
        let take = |frames: &mut &[u8], n: usize| -> Option<Vec<u8>> {
            let (head, rest) = frames.split_at_checked(n)?;
            *frames = rest;
            Some(head.to_vec())
        };
        fn len(bytes: &[u8]) -> usize {
            u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
        }
        while let Some(tag) = take(&mut frames, 1) {
            let parsed = match tag[0] {
                b'R' => (|| {
                    let head = take(&mut frames, 2)?;
                    take(&mut frames, usize::from(head[1]))?;
                    let n = len(&take(&mut frames, 4)?);
                    take(&mut frames, n)?;
                    let n = len(&take(&mut frames, 4)?);
                    take(&mut frames, n)?;
                    records += 1;
                    Some(())
                })(),
                b'F' => (|| {
                    let n = usize::from(take(&mut frames, 1)?[0]);
                    let name = take(&mut frames, n)?;
                    let n = len(&take(&mut frames, 4)?);
                    take(&mut frames, n)?;
                    if last_file.as_ref() != Some(&name) {
                        files += 1;
                        last_file = Some(name);
                    }
                    Some(())
                })(),
                _ => None,
            };
            if parsed.is_none() {
                break;
            }
        }
        (records, files)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
