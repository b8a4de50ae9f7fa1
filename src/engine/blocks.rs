//! The KV block pool: which blocks of the paged cache are free. Mirrors the
//! free-block queue of vLLM v1's `BlockPool` (`vllm/v1/core/block_pool.py`)
//! without prefix caching: a sequence holds the blocks its tokens need, gets
//! more as it grows, and gives all of them back when it finishes, is aborted
//! or is preempted.

/// Blocks a sequence of `tokens` tokens needs.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[derive(Debug)]
pub struct BlockPool {
    free: Vec<u32>,
    num_blocks: usize,
    block_size: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Pop from the end: hand out low block ids first (easier to read in logs).
        let free = (0..num_blocks as u32).rev().collect();
        BlockPool { free, num_blocks, block_size }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Tokens the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Fraction of blocks in use, 0..=1 (the server's KV usage gauge).
    pub fn usage(&self) -> f64 {
        if self.num_blocks == 0 {
            return 0.0;
        }
        1.0 - self.free.len() as f64 / self.num_blocks as f64
    }

    /// Extra blocks `table` needs to hold `tokens` tokens.
    pub fn needed(&self, table: &[u32], tokens: usize) -> usize {
        blocks_for(tokens, self.block_size).saturating_sub(table.len())
    }

    /// Grows `table` to hold `tokens` tokens; false (and `table` unchanged)
    /// when there are not enough free blocks.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.needed(table, tokens);
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        table.extend(self.free.drain(at..).rev());
        true
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        debug_assert!(table.iter().all(|&b| (b as usize) < self.num_blocks));
        // Most recently used last out: the freed blocks are handed out again first.
        self.free.extend(table.drain(..).rev());
        debug_assert!(self.free.len() <= self.num_blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_keep_every_block_accounted_for() {
        let mut pool = BlockPool::new(10, 4);
        assert_eq!(pool.capacity_tokens(), 40);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(pool.grow(&mut a, 5)); // 2 blocks
        assert_eq!(a.len(), 2);
        assert!(pool.grow(&mut a, 8)); // still 2
        assert_eq!(a.len(), 2);
        assert!(pool.grow(&mut a, 9)); // 3
        assert!(pool.grow(&mut b, 28)); // 7
        assert_eq!(pool.num_free(), 0);
        assert!((pool.usage() - 1.0).abs() < 1e-12);
        assert!(!pool.grow(&mut b, 29), "no block left");
        assert_eq!(b.len(), 7, "a failed grow leaves the table alone");
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>(), "each block handed out once");
        pool.release(&mut a);
        assert!(a.is_empty());
        assert_eq!(pool.num_free(), 3);
        pool.release(&mut b);
        assert_eq!(pool.num_free(), 10);
        assert_eq!(pool.needed(&[], 0), 0);
        assert_eq!(blocks_for(0, 4), 0);
        assert_eq!(blocks_for(4, 4), 1);
    }
}
