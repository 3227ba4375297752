//! What a file was given since its last sync: the pages written and the size set, held in
//! memory until a sync writes them to the backing file or a crash throws them away.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The unit in which unsynced data is kept and lost, as a kernel page cache does.
pub(crate) const PAGE: u64 = 4096;

/// The unsynced state of one file. Reads see it over the backing file; the backing file holds
/// only what the last sync wrote.
#[derive(Debug)]
pub(crate) struct Unsynced {
    /// Page index to `PAGE` bytes; bytes of a page past `size` are zero.
    pages: BTreeMap<u64, Vec<u8>>,
    /// The file's size as its readers see it.
    size: u64,
    /// The smallest size the file has had since its last sync: backing bytes from here on are
    /// stale (a truncation cut them) and read as zeros unless a page holds them.
    floor: u64,
}

impl Unsynced {
    /// The state of a file whose backing file is `backing_len` bytes long and fully synced.
    pub(crate) fn new(backing_len: u64) -> Self {
        Self {
            pages: BTreeMap::new(),
            size: backing_len,
            floor: backing_len,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes held in memory (whole pages).
    pub(crate) fn held_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }

    /// Page `index` as reads see it when no unsynced page holds it.
    fn load(&self, backing: &File, index: u64) -> io::Result<Vec<u8>> {
        let mut page = vec![0; PAGE as usize];
        let start = index * PAGE;
        if start < self.floor {
            let end = self.floor.min(start + PAGE);
            read_at_most(backing, start, &mut page[..(end - start) as usize])?;
        }
        Ok(page)
    }

    pub(crate) fn write(&mut self, backing: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(rustix::io::Errno::FBIG.raw_os_error()))?;
        let mut at = offset;
        while at < end {
            let index = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE - at % PAGE).min(end - at) as usize;
            if !self.pages.contains_key(&index) {
                let page = self.load(backing, index)?;
                self.pages.insert(index, page);
            }
            let done = (at - offset) as usize;
            if let Some(page) = self.pages.get_mut(&index) {
                page[within..within + n].copy_from_slice(&data[done..done + n]);
            }
            at += n as u64;
        }
        self.size = self.size.max(end);
        Ok(())
    }

    pub(crate) fn read(&self, backing: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let end = self.size.min(offset.saturating_add(len as u64));
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut at = offset;
        while at < end {
            let index = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE - at % PAGE).min(end - at) as usize;
            match self.pages.get(&index) {
                Some(page) => out.extend_from_slice(&page[within..within + n]),
                None => out.extend_from_slice(&self.load(backing, index)?[within..within + n]),
            }
            at += n as u64;
        }
        Ok(out)
    }

    /// Sets the size: a shrink drops the pages past it (and zeroes the tail of the last), a
    /// growth reads as zeros.
    pub(crate) fn truncate(&mut self, size: u64) {
        if size < self.size {
            drop(self.pages.split_off(&size.div_ceil(PAGE)));
            if !size.is_multiple_of(PAGE)
                && let Some(page) = self.pages.get_mut(&(size / PAGE))
            {
                page[(size % PAGE) as usize..].fill(0);
            }
            self.floor = self.floor.min(size);
        }
        self.size = size;
    }

    /// Makes the backing file what reads return: cut what a truncation cut, write every
    /// page, set the size.
    pub(crate) fn write_through(&self, backing: &File) -> io::Result<()> {
        if backing.metadata()?.len() > self.floor {
            backing.set_len(self.floor)?;
        }
        for (index, page) in &self.pages {
            let start = index * PAGE;
            if start >= self.size {
                break;
            }
            let n = (self.size - start).min(PAGE) as usize;
            backing.write_all_at(&page[..n], start)?;
        }
        backing.set_len(self.size)
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; the rest stays as it was.
pub(crate) fn read_at_most(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn backing(bytes: &[u8]) -> File {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(bytes, 0).unwrap();
        file
    }

    fn contents(file: &File) -> Vec<u8> {
        let mut buf = vec![0; file.metadata().unwrap().len() as usize];
        read_at_most(file, 0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn writes_are_read_back_over_the_backing_file_and_reach_it_only_when_written_through() {
        let file = backing(&[1; 5000]);
        let mut state = Unsynced::new(5000);
        state.write(&file, 4094, &[7; 4]).unwrap();
        state.write(&file, 6000, &[9; 2]).unwrap();
        let read = state.read(&file, 0, 10_000).unwrap();
        assert_eq!(read.len(), 6002);
        assert_eq!(&read[4092..4100], &[1, 1, 7, 7, 7, 7, 1, 1]);
        assert!(
            read[5000..6000].iter().all(|b| *b == 0),
            "a hole reads as zeros"
        );
        assert_eq!(
            contents(&file),
            vec![1; 5000],
            "nothing reached the backing file"
        );
        state.write_through(&file).unwrap();
        assert_eq!(contents(&file), read);
    }

    #[test]
    fn a_shrink_then_growth_reads_zeros_where_the_old_bytes_were() {
        let file = backing(&[3; 9000]);
        let mut state = Unsynced::new(9000);
        state.truncate(100);
        state.truncate(9000);
        let read = state.read(&file, 0, 9000).unwrap();
        assert_eq!(&read[..100], &[3; 100]);
        assert!(read[100..].iter().all(|b| *b == 0));
        state.write_through(&file).unwrap();
        assert_eq!(contents(&file), read);
    }

    #[test]
    fn a_truncation_of_a_dirty_page_zeroes_its_tail() {
        let file = backing(&[]);
        let mut state = Unsynced::new(0);
        state.write(&file, 0, &[5; 4096]).unwrap();
        state.truncate(10);
        state.write(&file, 20, &[6]).unwrap();
        let read = state.read(&file, 0, 100).unwrap();
        assert_eq!(read, [&[5; 10][..], &[0; 10], &[6]].concat());
    }
}
