//! A redb [`StorageBackend`] that reads a database file and never writes it: every write and
//! length change lands in RAM instead. The embedded store opens an existing file through it
//! first (see [`super::embedded_open`]), so whatever redb does while opening a damaged file —
//! rewriting the header, repairing the allocator state, committing the repair — changes nothing
//! on disk; only a file that opens and reads cleanly this way is then opened for real.
//!
//! Locks are the real file's (taken through redb's own [`FileBackend`]), so a file another
//! process holds open is reported as such, exactly as a real open would.
//!
//! Memory: one [`BLOCK`] per block written (redb writes its header, the repair's allocator
//! state and the few pages of one commit: kilobytes to a few megabytes for any store DLB keeps).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Bound;

use parking_lot::Mutex;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// The granularity of the in-memory copy of written bytes.
const BLOCK: u64 = 4096;

/// Reads through to a file, keeps writes in RAM. See the module docs.
#[derive(Debug)]
pub(super) struct ScratchBackend {
    file: FileBackend,
    state: Mutex<Scratch>,
}

#[derive(Debug)]
struct Scratch {
    /// Bytes of the file still visible below the written blocks (a shrink hides the rest).
    base_len: u64,
    /// The length redb sees.
    len: u64,
    /// Written blocks, by block index: the whole block as redb last left it.
    blocks: BTreeMap<u64, Box<[u8]>>,
}

impl ScratchBackend {
    /// Wraps `file` (opened for reading; it is never written).
    pub(super) fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        let file = FileBackend::new(file).map_err(io::Error::other)?;
        Ok(Self {
            file,
            state: Mutex::new(Scratch {
                base_len: len,
                len,
                blocks: BTreeMap::new(),
            }),
        })
    }

    /// Fills `out` with the bytes at `offset` as the file has them (zeros past its visible end).
    fn read_base(&self, base_len: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let from_file = base_len.saturating_sub(offset).min(out.len() as u64) as usize;
        if from_file > 0 {
            self.file.read(offset, &mut out[..from_file])?;
        }
        out[from_file..].fill(0);
        Ok(())
    }
}

fn past_end() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the file",
    )
}

impl StorageBackend for ScratchBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let s = self.state.lock();
        let end = offset.checked_add(out.len() as u64).ok_or_else(past_end)?;
        if end > s.len {
            return Err(past_end());
        }
        let mut at = offset;
        let mut done = 0usize;
        while done < out.len() {
            let block = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(out.len() - done);
            let dst = &mut out[done..done + n];
            match s.blocks.get(&block) {
                Some(b) => dst.copy_from_slice(&b[within..within + n]),
                None => self.read_base(s.base_len, at, dst)?,
            }
            at += n as u64;
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        if len < s.len {
            // Bytes past the new end read as zeros if the storage grows again.
            s.base_len = s.base_len.min(len);
            let first_gone = len.div_ceil(BLOCK);
            s.blocks.split_off(&first_gone);
            if let Some(b) = s.blocks.get_mut(&(len / BLOCK)) {
                b[(len % BLOCK) as usize..].fill(0);
            }
        }
        s.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock();
        let end = offset.checked_add(data.len() as u64).ok_or_else(past_end)?;
        let mut at = offset;
        let mut done = 0usize;
        while done < data.len() {
            let block = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(data.len() - done);
            if !s.blocks.contains_key(&block) {
                let mut fresh = vec![0u8; BLOCK as usize].into_boxed_slice();
                let visible = s.len.saturating_sub(block * BLOCK).min(BLOCK) as usize;
                self.read_base(s.base_len, block * BLOCK, &mut fresh[..visible])?;
                s.blocks.insert(block, fresh);
            }
            if let Some(b) = s.blocks.get_mut(&block) {
                b[within..within + n].copy_from_slice(&data[done..done + n]);
            }
            at += n as u64;
            done += n;
        }
        s.len = s.len.max(end);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stay_in_ram_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &original).unwrap();
        let b = ScratchBackend::new(File::open(&path).unwrap()).unwrap();
        b.write(4090, &[7; 20]).unwrap();
        let mut out = vec![0; 30];
        b.read(4080, &mut out).unwrap();
        assert_eq!(&out[..10], &original[4080..4090]);
        assert_eq!(&out[10..30], &[7; 20]);
        // Shrink, grow: the hidden tail reads as zeros, in and past the written block.
        b.set_len(4095).unwrap();
        b.set_len(9000).unwrap();
        let mut out = vec![1; 10];
        b.read(4094, &mut out).unwrap();
        assert_eq!(out, [7, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        b.read(8000, &mut out).unwrap();
        assert_eq!(out, [0; 10]);
        assert!(b.read(8995, &mut out).is_err());
        // Writing past the end extends it.
        b.write(20_000, &[3; 5]).unwrap();
        assert_eq!(b.len().unwrap(), 20_005);
        assert_eq!(std::fs::read(&path).unwrap(), original);
    }
}
