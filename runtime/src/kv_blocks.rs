//! Reference-counted allocator of paged KV-cache blocks.
//!
//! The KV cache is a pool of fixed-size blocks; a sequence owns a list of
//! them (its block-table row). Blocks are reference counted so that several
//! sequences can share the blocks of a common prompt prefix: a shared block
//! is read-only, and a sequence about to write into one first gets a private
//! copy ([`BlockAllocator::make_writable`], copy-on-write). A block returns
//! to the free list when its last reference is released.

use anyhow::{bail, Result};

/// What the caller must do before writing into a block it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteTarget {
    /// The block is held only by the caller: write in place.
    InPlace(u32),
    /// The block was shared: the caller now holds `to` instead of `from`
    /// and must copy `from`'s cache contents into `to` before writing.
    Copy { from: u32, to: u32 },
}

/// A pool of `num_blocks` KV-cache blocks with reference counts.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    refs: Vec<u32>,
    /// Free blocks, popped from the end (lowest index first).
    free: Vec<u32>,
    allocations: usize,
    peak_in_use: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        BlockAllocator {
            refs: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            allocations: 0,
            peak_in_use: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn in_use(&self) -> usize {
        self.num_blocks() - self.free_count()
    }

    /// The most blocks ever in use at once.
    pub fn peak_in_use(&self) -> usize {
        self.peak_in_use
    }

    /// How many times a free block was handed out.
    pub fn allocations(&self) -> usize {
        self.allocations
    }

    pub fn refcount(&self, block: u32) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// A free block with one reference, or `None` when every block is in use.
    pub fn alloc(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        self.allocations += 1;
        self.peak_in_use = self.peak_in_use.max(self.in_use());
        Some(b)
    }

    /// One more reference to a block in use (a sequence sharing it).
    pub fn retain(&mut self, block: u32) -> Result<()> {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                Ok(())
            }
            Some(_) => bail!("retain of KV block {block}, which is free"),
            None => bail!("retain of KV block {block}, outside the cache of {} blocks", self.refs.len()),
        }
    }

    /// Drop one reference; returns true when the block became free.
    pub fn release(&mut self, block: u32) -> Result<bool> {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r -= 1;
                if *r == 0 {
                    self.free.push(block);
                }
                Ok(*r == 0)
            }
            Some(_) => bail!("release of KV block {block}, which is already free"),
            None => bail!("release of KV block {block}, outside the cache of {} blocks", self.refs.len()),
        }
    }

    /// Share every block of `table` with a new holder (a forked sequence).
    pub fn fork(&mut self, table: &[u32]) -> Result<Vec<u32>> {
        for &b in table {
            self.retain(b)?;
        }
        Ok(table.to_vec())
    }

    /// Release every block of `table`.
    pub fn release_all(&mut self, table: &[u32]) -> Result<()> {
        for &b in table {
            self.release(b)?;
        }
        Ok(())
    }

    /// Prepare `block` (held by the caller) for writing: in place when the
    /// caller is its only holder, otherwise a fresh private block replaces
    /// the caller's reference. `None` when a copy is needed but no block is
    /// free.
    pub fn make_writable(&mut self, block: u32) -> Result<Option<WriteTarget>> {
        match self.refcount(block) {
            0 => bail!("write to KV block {block}, which is not held"),
            1 => Ok(Some(WriteTarget::InPlace(block))),
            _ => {
                let Some(to) = self.alloc() else { return Ok(None) };
                self.release(block)?;
                Ok(Some(WriteTarget::Copy { from: block, to }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_return_to_the_pool_when_their_last_reference_goes() {
        let mut a = BlockAllocator::new(3);
        let (x, y) = (a.alloc().unwrap(), a.alloc().unwrap());
        assert_ne!(x, y);
        assert_eq!((a.free_count(), a.in_use()), (1, 2));
        a.retain(x).unwrap();
        assert_eq!(a.refcount(x), 2);
        assert!(!a.release(x).unwrap(), "one holder left");
        assert!(a.release(x).unwrap(), "last holder gone");
        assert_eq!(a.free_count(), 2);
        assert!(a.release(x).is_err(), "double free");
        assert!(a.retain(x).is_err(), "retain of a free block");
        assert!(a.release(7).is_err(), "outside the cache");
        let _ = (a.alloc().unwrap(), a.alloc().unwrap());
        assert!(a.alloc().is_none(), "all 3 in use");
        assert_eq!((a.peak_in_use(), a.allocations()), (3, 4));
        a.release(y).unwrap();
        assert_eq!(a.alloc(), Some(y), "freed block is reused");
    }

    #[test]
    fn shared_blocks_are_copied_before_a_write() {
        let mut a = BlockAllocator::new(4);
        let table = vec![a.alloc().unwrap(), a.alloc().unwrap()];
        let forked = a.fork(&table).unwrap();
        assert!(table.iter().all(|b| a.refcount(*b) == 2));
        // The fork writes into its last block: it gets a private copy.
        let last = forked[1];
        let Some(WriteTarget::Copy { from, to }) = a.make_writable(last).unwrap() else { panic!("must copy") };
        assert_eq!(from, last);
        assert_ne!(to, last);
        assert_eq!((a.refcount(last), a.refcount(to)), (1, 1));
        // The original is now the only holder of `last`: in place.
        assert_eq!(a.make_writable(last).unwrap(), Some(WriteTarget::InPlace(last)));
        // No free block for a copy: the caller must wait or preempt.
        a.retain(table[0]).unwrap();
        let _ = a.alloc().unwrap();
        assert_eq!(a.free_count(), 0);
        assert_eq!(a.make_writable(table[0]).unwrap(), None);
        a.release_all(&[table[0], table[0], table[0]]).unwrap();
        assert_eq!(a.free_count(), 1);
    }
}
