//! The FUSE side: every operation is passed to the backing directory at once, except file data
//! and file sizes, which stay in [`Unsynced`] until the file is synced.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::OFlags;

use crate::cache::{PAGE, Unsynced, read_at_most};

/// How long the kernel may keep attributes and names. Every change goes through this file
/// system, so what it was told stays true.
const TTL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct OpenFile {
    ino: u64,
    file: File,
}

/// Everything the file system knows, behind one lock (operations are served one at a time).
#[derive(Debug)]
pub(crate) struct State {
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    open: HashMap<u64, OpenFile>,
    next_fh: u64,
    unsynced: HashMap<u64, Unsynced>,
    crashed: bool,
}

/// What a crash threw away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Files that had writes or size changes not yet synced.
    pub files: usize,
    /// Their paths in the backing directory, sorted (unlinked ones left out).
    pub paths: Vec<PathBuf>,
    /// Bytes of unsynced pages dropped (whole pages).
    pub bytes: u64,
}

impl State {
    pub(crate) fn new(root: PathBuf) -> Self {
        let mut state = Self {
            paths: HashMap::new(),
            inos: HashMap::new(),
            next_ino: 2,
            open: HashMap::new(),
            next_fh: 1,
            unsynced: HashMap::new(),
            crashed: false,
        };
        state.paths.insert(INodeNo::ROOT.0, root.clone());
        state.inos.insert(root, INodeNo::ROOT.0);
        state
    }

    /// Drops every unsynced write; from now on every operation fails with EIO.
    pub(crate) fn crash(&mut self) -> Lost {
        let mut paths: Vec<PathBuf> = self
            .unsynced
            .keys()
            .filter_map(|ino| self.paths.get(ino).cloned())
            .collect();
        paths.sort();
        let lost = Lost {
            files: self.unsynced.len(),
            paths,
            bytes: self.unsynced.values().map(Unsynced::held_bytes).sum(),
        };
        self.unsynced.clear();
        self.crashed = true;
        lost
    }

    /// Writes every unsynced file through, as a kernel's background write-back may at any
    /// time; returns how many files it wrote.
    pub(crate) fn write_back(&mut self) -> std::io::Result<usize> {
        let inos: Vec<u64> = self.unsynced.keys().copied().collect();
        for ino in &inos {
            let Some(unsynced) = self.unsynced.get(ino) else {
                continue;
            };
            match self.open.values().find(|f| f.ino == *ino) {
                Some(open) => unsynced.write_through(&open.file)?,
                // Unlinked and closed, it has no path: nothing can read it any more.
                None => {
                    if let Some(path) = self.paths.get(ino) {
                        unsynced.write_through(&opened(path)?)?;
                    }
                }
            }
            self.unsynced.remove(ino);
        }
        Ok(inos.len())
    }

    pub(crate) fn unsynced_files(&self) -> usize {
        self.unsynced.len()
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        if name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Err(Errno::EINVAL);
        }
        Ok(self.path(parent)?.join(name))
    }

    fn ino_for(&mut self, path: PathBuf) -> u64 {
        if let Some(ino) = self.inos.get(&path) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(ino, path.clone());
        self.inos.insert(path, ino);
        ino
    }

    /// The name `path` is gone: forget it, and the unsynced data of its file unless the file is
    /// still open (an open file can still be written and synced).
    fn forget_path(&mut self, path: &Path) {
        if let Some(ino) = self.inos.remove(path) {
            self.paths.remove(&ino);
            if !self.open.values().any(|f| f.ino == ino) {
                self.unsynced.remove(&ino);
            }
        }
    }

    fn attr(&self, ino: u64, meta: &Metadata) -> FileAttr {
        let size = self.unsynced.get(&ino).map(Unsynced::size);
        let time = |secs: i64, nanos: i64| {
            u64::try_from(secs)
                .ok()
                .and_then(|s| UNIX_EPOCH.checked_add(Duration::new(s, nanos as u32)))
                .unwrap_or(UNIX_EPOCH)
        };
        FileAttr {
            ino: INodeNo(ino),
            size: size.unwrap_or(meta.len()),
            blocks: size.map_or(meta.blocks(), |s| s.div_ceil(512)),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: meta.created().unwrap_or(UNIX_EPOCH),
            kind: FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: PAGE as u32,
            flags: 0,
        }
    }

    /// Metadata of `ino`: through its open file when one is given (the name may be gone).
    fn metadata(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<Metadata, Errno> {
        if let Some(open) = fh.and_then(|fh| self.open.get(&fh.0)) {
            return Ok(open.file.metadata()?);
        }
        Ok(fs::symlink_metadata(self.path(ino)?)?)
    }

    fn open_file(&mut self, ino: u64, file: File) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.open.insert(fh, OpenFile { ino, file });
        fh
    }

    fn truncate(&mut self, ino: u64, backing_len: u64, size: u64) {
        self.unsynced
            .entry(ino)
            .or_insert_with(|| Unsynced::new(backing_len))
            .truncate(size);
    }
}

/// The file system the kernel talks to.
#[derive(Debug)]
pub(crate) struct LossyFs {
    pub(crate) state: Arc<Mutex<State>>,
}

pub(crate) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while serving cannot leave the maps half-updated in a way that matters more
    // than the panic itself; keep serving so that unmounting works.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn opened(path: &Path) -> std::io::Result<File> {
    // Read and write whatever the caller asked: the handle also writes synced data through.
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .or_else(|_| File::open(path))
}

fn has(flags: i32, flag: OFlags) -> bool {
    (flags as u32) & flag.bits() != 0
}

impl LossyFs {
    fn serve<T>(
        &self,
        reply: impl FnOnce(Result<T, Errno>),
        op: impl FnOnce(&mut State) -> Result<T, Errno>,
    ) {
        let mut state = lock(&self.state);
        if state.crashed {
            return reply(Err(Errno::EIO));
        }
        reply(op(&mut state));
    }
}

macro_rules! answer {
    ($reply:ident, $ok:expr) => {
        |result| match result {
            Ok(value) => $ok($reply, value),
            Err(e) => $reply.error(e),
        }
    };
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.serve(
            answer!(reply, |r: ReplyEntry, a| r.entry(&TTL, &a, Generation(0))),
            |s| {
                let path = s.child(parent, name)?;
                let meta = fs::symlink_metadata(&path)?;
                let ino = s.ino_for(path);
                Ok(s.attr(ino, &meta))
            },
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.serve(answer!(reply, |r: ReplyAttr, a| r.attr(&TTL, &a)), |s| {
            let meta = s.metadata(ino, fh)?;
            Ok(s.attr(ino.0, &meta))
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.serve(answer!(reply, |r: ReplyAttr, a| r.attr(&TTL, &a)), |s| {
            let path = s.path(ino);
            if let Some(mode) = mode {
                fs::set_permissions(path.clone()?, fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(path.clone()?, uid, gid)?;
            }
            if atime.is_some() || mtime.is_some() {
                let at = |t: TimeOrNow| match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                let mut times = fs::FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(at(t));
                }
                if let Some(t) = mtime {
                    times = times.set_modified(at(t));
                }
                opened(&path.clone()?)?.set_times(times)?;
            }
            if let Some(size) = size {
                let meta = s.metadata(ino, fh)?;
                if !meta.is_file() {
                    return Err(Errno::EISDIR);
                }
                s.truncate(ino.0, meta.len(), size);
            }
            let meta = s.metadata(ino, fh)?;
            Ok(s.attr(ino.0, &meta))
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.serve(
            answer!(reply, |r: ReplyData, t: PathBuf| r
                .data(t.as_os_str().as_bytes())),
            |s| Ok(fs::read_link(s.path(ino)?)?),
        );
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.serve(
            answer!(reply, |r: ReplyEntry, a| r.entry(&TTL, &a, Generation(0))),
            |s| {
                let path = s.child(parent, name)?;
                fs::DirBuilder::new()
                    .mode(mode & !umask & 0o7777)
                    .create(&path)?;
                let meta = fs::symlink_metadata(&path)?;
                let ino = s.ino_for(path);
                Ok(s.attr(ino, &meta))
            },
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.serve(answer!(reply, |r: ReplyEmpty, ()| r.ok()), |s| {
            let path = s.child(parent, name)?;
            fs::remove_file(&path)?;
            s.forget_path(&path);
            Ok(())
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.serve(answer!(reply, |r: ReplyEmpty, ()| r.ok()), |s| {
            let path = s.child(parent, name)?;
            fs::remove_dir(&path)?;
            s.forget_path(&path);
            Ok(())
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.serve(answer!(reply, |r: ReplyEmpty, ()| r.ok()), |s| {
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            let from = s.child(parent, name)?;
            let to = s.child(newparent, newname)?;
            fs::rename(&from, &to)?;
            if from == to {
                return Ok(());
            }
            s.forget_path(&to);
            // The renamed entry and, for a directory, everything under it.
            let moved: Vec<(u64, PathBuf)> = s
                .paths
                .iter()
                .filter_map(|(ino, p)| {
                    p.strip_prefix(&from).ok().map(|rest| {
                        (
                            *ino,
                            if rest.as_os_str().is_empty() {
                                to.clone()
                            } else {
                                to.join(rest)
                            },
                        )
                    })
                })
                .collect();
            for (ino, new) in moved {
                if let Some(old) = s.paths.insert(ino, new.clone()) {
                    s.inos.remove(&old);
                }
                s.inos.insert(new, ino);
            }
            Ok(())
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.serve(
            answer!(reply, |r: ReplyOpen, fh| r
                .opened(FileHandle(fh), FopenFlags::empty())),
            |s| {
                let path = s.path(ino)?;
                let file = opened(&path)?;
                if has(flags.0, OFlags::TRUNC) {
                    let len = file.metadata()?.len();
                    s.truncate(ino.0, len, 0);
                }
                Ok(s.open_file(ino.0, file))
            },
        );
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.serve(
            answer!(reply, |r: ReplyCreate, (a, fh)| r.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty()
            )),
            |s| {
                let path = s.child(parent, name)?;
                let mut options = fs::OpenOptions::new();
                options.read(true).write(true).mode(mode & !umask & 0o7777);
                if has(flags, OFlags::EXCL) {
                    options.create_new(true);
                } else {
                    options.create(true);
                }
                // The creation is a directory operation and passes through; a truncation of an
                // existing file is data and waits for a sync like any other.
                let file = options.open(&path)?;
                let ino = s.ino_for(path);
                if has(flags, OFlags::TRUNC) {
                    let len = file.metadata()?.len();
                    s.truncate(ino, len, 0);
                }
                let meta = file.metadata()?;
                let attr = s.attr(ino, &meta);
                Ok((attr, s.open_file(ino, file)))
            },
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.serve(answer!(reply, |r: ReplyData, d: Vec<u8>| r.data(&d)), |s| {
            let open = s.open.get(&fh.0).ok_or(Errno::EBADF)?;
            match s.unsynced.get(&ino.0) {
                Some(unsynced) => Ok(unsynced.read(&open.file, offset, size as usize)?),
                None => {
                    let mut buf = vec![0; size as usize];
                    let n = read_at_most(&open.file, offset, &mut buf)?;
                    buf.truncate(n);
                    Ok(buf)
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.serve(answer!(reply, |r: ReplyWrite, n| r.written(n)), |s| {
            let open = s.open.get(&fh.0).ok_or(Errno::EBADF)?;
            let unsynced = match s.unsynced.entry(ino.0) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Unsynced::new(open.file.metadata()?.len()))
                }
            };
            unsynced.write(&open.file, offset, data)?;
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        self.serve(answer!(reply, |r: ReplyEmpty, ()| r.ok()), |_| Ok(()));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Answered even after a crash, so that the kernel can let go of the file.
        lock(&self.state).open.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fsync and fdatasync alike write the data and the size through.
        self.serve(answer!(reply, |r: ReplyEmpty, ()| r.ok()), |s| {
            let Some(unsynced) = s.unsynced.remove(&ino.0) else {
                return Ok(());
            };
            let written = match s.open.get(&fh.0) {
                Some(open) => unsynced.write_through(&open.file).map_err(Errno::from),
                None => s.path(ino).and_then(|p| {
                    opened(&p)
                        .and_then(|f| unsynced.write_through(&f))
                        .map_err(Errno::from)
                }),
            };
            if let Err(e) = written {
                s.unsynced.insert(ino.0, unsynced);
                return Err(e);
            }
            Ok(())
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = lock(&self.state);
        if state.crashed {
            return reply.error(Errno::EIO);
        }
        let listed = (|| -> Result<Vec<(u64, FileType, std::ffi::OsString)>, Errno> {
            let path = state.path(ino)?;
            let mut names: Vec<_> = fs::read_dir(&path)?
                .filter_map(Result::ok)
                .map(|e| (e.file_name(), e.file_type().ok()))
                .collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            let parent = match path.parent() {
                Some(p) if state.inos.contains_key(p) => state.ino_for(p.to_owned()),
                _ => INodeNo::ROOT.0,
            };
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (parent, FileType::Directory, "..".into()),
            ];
            for (name, kind) in names {
                let child = state.ino_for(path.join(&name));
                let kind = kind
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                entries.push((child, kind, name));
            }
            Ok(entries)
        })();
        match listed {
            Ok(entries) => {
                for (i, (child, kind, name)) in
                    entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory operations passed through when they were made.
        self.serve(answer!(reply, |r: ReplyEmpty, ()| r.ok()), |_| Ok(()));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.serve(
            answer!(reply, |r: ReplyStatfs, v: rustix::fs::StatVfs| r.statfs(
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                v.f_bsize as u32,
                v.f_namemax as u32,
                v.f_frsize as u32
            )),
            |s| {
                Ok(rustix::fs::statvfs(s.path(INodeNo::ROOT)?.as_path())
                    .map_err(std::io::Error::from)?)
            },
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.serve(answer!(reply, |r: ReplyEmpty, ()| r.ok()), |_| Ok(()));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Plain allocation only (it may grow the file); hole punching and the like are refused.
        self.serve(answer!(reply, |r: ReplyEmpty, ()| r.ok()), |s| {
            if mode != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
            let meta = s.metadata(ino, Some(fh))?;
            let size = s.unsynced.get(&ino.0).map_or(meta.len(), Unsynced::size);
            if end > size {
                s.truncate(ino.0, meta.len(), end);
            }
            Ok(())
        });
    }
}
