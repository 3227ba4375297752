//! Test support: a FUSE pass-through file system that loses every write not yet synced when it
//! is told to crash, the way a power cut loses the page cache. In the spirit of LazyFS
//! (<https://github.com/dsrhaslab/lazyfs>), which is not packaged; written with `fuser`'s
//! pure-Rust mount (no libfuse), so it needs `/dev/fuse` and root, nothing else.
//!
//! # What it models
//!
//! - **File data and file sizes** are kept in memory, per file, in 4 KiB pages: `write`,
//!   `truncate`/`set_len`, `O_TRUNC` and plain `fallocate` change only that memory, and reads
//!   see it. `fsync` or `fdatasync` on the file writes its data and size through to the backing
//!   directory (both the same: a sync makes the whole file as it reads now durable). `close`
//!   makes nothing durable.
//! - **[`LossyMount::crash`]** throws away everything not yet synced, in every file, and fails
//!   every later operation with EIO, as a dead machine would. Unmount, then look at the backing
//!   directory: it holds what a machine that lost power at that instant would find.
//!
//! # What it does not model
//!
//! - **Directory operations are durable at once**: create, mkdir, rename, unlink and rmdir pass
//!   straight through, so a crash never loses a name, only data. A real file system may lose a
//!   rename or a new name whose directory was not synced; this one cannot show that bug (it does
//!   show the other half: a file renamed into place before its data was synced is empty after a
//!   crash). `fsyncdir` is accepted and does nothing.
//! - **No torn or reordered writes**: unsynced data is lost whole, per file; a crash never keeps
//!   some unsynced pages and drops others, and never tears a page. Nothing is written back in the
//!   background either, which a kernel would do: the file system is as pessimistic as POSIX
//!   allows about data, not as a real machine usually is.
//! - Durable means written to the backing directory, whose host does not crash; the backing
//!   file system's own fsync is not called.
//! - No `mmap` writes beyond what the kernel turns into FUSE writes, no xattrs, no hard links or
//!   symlink creation, no locks beyond what the kernel keeps locally. Operations are served one
//!   at a time.

mod cache;
mod fs;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption};
use rustix::mount::UnmountFlags;

pub use fs::Lost;
use fs::{LossyFs, State, lock};

/// A mounted lossy file system; unmounted when dropped (a test that fails still unmounts).
#[derive(Debug)]
pub struct LossyMount {
    session: Option<BackgroundSession>,
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
}

impl LossyMount {
    /// Mounts a view of `backing` (an existing directory) at `mountpoint` (an existing, empty
    /// directory). Needs root and `/dev/fuse`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<Self> {
        let backing = backing.canonicalize()?;
        let state = Arc::new(Mutex::new(State::new(backing)));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lossyfs".into()),
            MountOption::Subtype("lossyfs".into()),
        ];
        let filesystem = LossyFs {
            state: state.clone(),
        };
        let session = fuser::spawn_mount(filesystem, mountpoint, &config)?;
        Ok(Self {
            session: Some(session),
            state,
            mountpoint: mountpoint.to_owned(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Files with writes or size changes not yet synced.
    pub fn unsynced_files(&self) -> usize {
        lock(&self.state).unsynced_files()
    }

    /// Writes every unsynced file through to the backing directory, as a kernel's background
    /// write-back may do at any moment: a test calls it to make its set-up durable before the
    /// part whose durability it checks.
    pub fn write_back(&self) -> io::Result<usize> {
        lock(&self.state).write_back()
    }

    /// Loses every write not yet synced; every later operation fails with EIO.
    pub fn crash(&self) -> Lost {
        lock(&self.state).crash()
    }

    /// Unmounts and waits (up to ten seconds) for the file system's thread to end. The
    /// unmount is lazy: the name goes at once, and the file system ends when the last file
    /// open on it is closed (a killed process's files are). An error says it did not end in
    /// time; it still ends when those files are closed.
    pub fn unmount(mut self) -> io::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let detached = rustix::mount::unmount(&self.mountpoint, UnmountFlags::DETACH);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !session.guard.is_finished() {
            // Dropping the session leaves its thread to end on its own.
            return Err(io::Error::other(format!(
                "{} is still in use ten seconds after a lazy unmount",
                self.mountpoint.display()
            )));
        }
        detached.map_err(io::Error::from)?;
        match session.join() {
            // The session's last read found the kernel's connection torn down rather than
            // unmounted (seen under load in CI): either way the file system has ended.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(()),
            ended => ended,
        }
    }
}

impl Drop for LossyMount {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::*;

    struct Fixture {
        backing: tempfile::TempDir,
        mount: LossyMount,
        _mountpoint: tempfile::TempDir,
    }

    fn mounted() -> Fixture {
        let backing = tempfile::tempdir().unwrap();
        let mountpoint = tempfile::tempdir().unwrap();
        let mount = LossyMount::mount(backing.path(), mountpoint.path())
            .expect("mounting needs root and /dev/fuse");
        Fixture {
            backing,
            mount,
            _mountpoint: mountpoint,
        }
    }

    impl Fixture {
        fn path(&self, name: &str) -> PathBuf {
            self.mount.mountpoint().join(name)
        }

        fn crash_and_read(self, name: &str) -> Option<Vec<u8>> {
            self.mount.crash();
            self.mount.unmount().unwrap();
            std::fs::read(self.backing.path().join(name)).ok()
        }
    }

    #[test]
    fn a_write_that_was_never_synced_is_gone_after_a_crash() {
        let fx = mounted();
        let mut file = std::fs::File::create(fx.path("a")).unwrap();
        file.write_all(b"not durable").unwrap();
        drop(file);
        assert_eq!(std::fs::read(fx.path("a")).unwrap(), b"not durable");
        assert_eq!(fx.mount.unsynced_files(), 1);
        // The name passed through; the data did not.
        assert_eq!(fx.crash_and_read("a").unwrap(), b"");
    }

    #[test]
    fn a_write_followed_by_fdatasync_survives_a_crash() {
        let fx = mounted();
        let mut file = std::fs::File::create(fx.path("a")).unwrap();
        file.write_all(b"durable").unwrap();
        file.sync_data().unwrap();
        drop(file);
        assert_eq!(fx.mount.unsynced_files(), 0);
        assert_eq!(fx.crash_and_read("a").unwrap(), b"durable");
    }

    #[test]
    fn writes_after_the_last_sync_are_gone_and_the_synced_data_before_them_stays() {
        let fx = mounted();
        let file = std::fs::File::create(fx.path("log")).unwrap();
        file.write_all_at(&[1; 10_000], 0).unwrap();
        file.sync_all().unwrap();
        // An overwrite inside the synced data, an append and a growth by set_len, none synced.
        file.write_all_at(&[2; 100], 5_000).unwrap();
        file.write_all_at(&[3; 100], 10_000).unwrap();
        file.set_len(50_000).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 50_000);
        drop(file);
        assert_eq!(fx.crash_and_read("log").unwrap(), vec![1; 10_000]);
    }

    #[test]
    fn an_unsynced_truncation_is_undone_by_a_crash() {
        let fx = mounted();
        let file = std::fs::File::create(fx.path("f")).unwrap();
        file.write_all_at(b"0123456789", 0).unwrap();
        file.sync_data().unwrap();
        file.set_len(3).unwrap();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::open(fx.path("f")).unwrap(), &mut buf)
            .unwrap();
        assert_eq!(buf, b"012");
        drop(file);
        assert_eq!(fx.crash_and_read("f").unwrap(), b"0123456789");
    }

    #[test]
    fn a_synced_file_keeps_its_data_across_a_rename_and_an_unsynced_one_is_empty() {
        let fx = mounted();
        std::fs::create_dir(fx.path("dir")).unwrap();
        let mut synced = std::fs::File::create(fx.path("dir/tmp1")).unwrap();
        synced.write_all(b"synced").unwrap();
        synced.sync_all().unwrap();
        std::fs::rename(fx.path("dir/tmp1"), fx.path("dir/one")).unwrap();
        std::fs::write(fx.path("dir/tmp2"), b"unsynced").unwrap();
        std::fs::rename(fx.path("dir/tmp2"), fx.path("dir/two")).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(fx.path("dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["one", "two"]);
        assert_eq!(std::fs::read(fx.path("dir/two")).unwrap(), b"unsynced");
        drop(synced);
        let backing = fx.backing.path().to_owned();
        fx.mount.crash();
        fx.mount.unmount().unwrap();
        assert_eq!(std::fs::read(backing.join("dir/one")).unwrap(), b"synced");
        assert_eq!(std::fs::read(backing.join("dir/two")).unwrap(), b"");
    }

    #[test]
    fn written_back_data_survives_a_crash() {
        let fx = mounted();
        std::fs::write(fx.path("a"), b"written back").unwrap();
        assert_eq!(fx.mount.write_back().unwrap(), 1);
        assert_eq!(fx.mount.unsynced_files(), 0);
        assert_eq!(fx.crash_and_read("a").unwrap(), b"written back");
    }

    #[test]
    fn after_a_crash_every_operation_fails() {
        let fx = mounted();
        std::fs::write(fx.path("a"), b"x").unwrap();
        let lost = fx.mount.crash();
        assert_eq!(lost.files, 1);
        assert!(std::fs::File::create(fx.path("b")).is_err());
    }

    #[test]
    fn statfs_reports_the_backing_file_system() {
        let fx = mounted();
        let mounted = rustix::fs::statvfs(fx.mount.mountpoint()).unwrap();
        let backing = rustix::fs::statvfs(fx.backing.path()).unwrap();
        assert_eq!(mounted.f_blocks, backing.f_blocks);
    }
}
