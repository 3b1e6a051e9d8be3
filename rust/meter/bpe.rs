//! Byte-pair encoding over one pre-tokenized piece, in a count-only and an encoding flavour.
//!
//! Both tiktoken rank files and HuggingFace `merges` lists reduce to one table: for a pair of
//! adjacent token ids, the rank of their merge and the id it produces. tiktoken merges the
//! adjacent pair whose concatenation has the lowest rank; HF merges the pair with the lowest
//! merge index; both break ties leftmost. With the pair table built accordingly at load time the
//! same loop serves both.
//!
//! Performance notes:
//! - Most pieces of natural text are whole tokens, so a piece is first looked up whole (one hash
//!   of a few bytes) and only split into bytes when that misses. The whole-piece shortcut is only
//!   taken for tokens that BPE itself would produce from their own bytes (always true in tiktoken,
//!   checked per token at load for HF vocabularies, whose BPE may not reach every token).
//! - Short pieces use a flat array with a linear scan for the minimum (cache-friendly, no heap);
//!   long unbroken runs use a binary heap over a linked list, so one pathological run costs
//!   O(n log n) rather than O(n^2).
//! - Counting never materialises ids: it returns the number of surviving symbols.

use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Above this many bytes a piece is merged with the heap-based algorithm.
const LONG_PIECE: usize = 128;

/// Packs a piece of at most 7 bytes, with its length in the top byte, into one key.
#[inline]
fn short_key(bytes: &[u8]) -> Option<u64> {
    if bytes.len() > 7 {
        return None;
    }
    let mut buf = [0u8; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[7] = bytes.len() as u8;
    Some(u64::from_le_bytes(buf))
}

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

pub struct Bpe {
    /// id -> bytes, for decoding (empty for ids the vocabulary does not define).
    tokens: Vec<Box<[u8]>>,
    /// Which ids are defined (a vocabulary may be sparse).
    defined: Vec<bool>,
    /// piece bytes -> id, for the whole-piece shortcut: pieces of up to 7 bytes (most of
    /// them) are packed into one u64 key, longer ones are looked up by their bytes.
    short: FxHashMap<u64, u32>,
    whole: FxHashMap<Box<[u8]>, u32>,
    /// The id of every single byte.
    byte_ids: [u32; 256],
    /// Merge value of every pair of single bytes (65,536 entries, 512 KB): the first round of
    /// lookups in every piece hits this dense table instead of the hash map.
    byte_pairs: Box<[u64]>,
    /// (left id, right id) -> (rank << 32 | merged id).
    merges: FxHashMap<u64, u64>,
}

/// Raw material for a [`Bpe`]: the vocabulary and its merges, from a loader.
pub struct BpeSpec {
    /// (bytes, id) for every mergeable token.
    pub vocab: Vec<(Vec<u8>, u32)>,
    /// (left bytes, right bytes) in rank order; `None` for tiktoken vocabularies, whose merges
    /// are implied by token ranks.
    pub merges: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// HF's `ignore_merges`: a piece that is a whole token is taken as is.
    pub ignore_merges: bool,
}

pub enum BuildError {
    MissingByte(u8),
    MergeUnknown { index: usize, message: String },
}

impl Bpe {
    pub fn new(spec: BpeSpec) -> Result<Self, BuildError> {
        let max_id = spec.vocab.iter().map(|(_, id)| *id).max().unwrap_or(0) as usize;
        let mut tokens: Vec<Box<[u8]>> = vec![Box::default(); max_id + 1];
        let mut defined = vec![false; max_id + 1];
        let mut by_bytes: FxHashMap<Box<[u8]>, u32> = FxHashMap::default();
        by_bytes.reserve(spec.vocab.len());
        for (bytes, id) in spec.vocab {
            let boxed: Box<[u8]> = bytes.into_boxed_slice();
            tokens[id as usize] = boxed.clone();
            defined[id as usize] = true;
            by_bytes.insert(boxed, id);
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *by_bytes
                .get(&[b as u8][..])
                .ok_or(BuildError::MissingByte(b as u8))?;
        }

        let mut merges: FxHashMap<u64, u64> = FxHashMap::default();
        let tiktoken_style = spec.merges.is_none();
        match spec.merges {
            None => {
                // Every split of a token into two tokens is a merge producing it, ranked by the
                // token's own rank (= id in tiktoken files).
                merges.reserve(by_bytes.len() * 2);
                for (bytes, &id) in by_bytes.iter() {
                    for k in 1..bytes.len() {
                        if let (Some(&a), Some(&b)) =
                            (by_bytes.get(&bytes[..k]), by_bytes.get(&bytes[k..]))
                        {
                            merges.insert(pair_key(a, b), ((id as u64) << 32) | id as u64);
                        }
                    }
                }
            }
            Some(list) => {
                merges.reserve(list.len());
                let mut joined = Vec::new();
                for (rank, (left, right)) in list.iter().enumerate() {
                    let lookup = |part: &[u8]| {
                        by_bytes
                            .get(part)
                            .copied()
                            .ok_or_else(|| BuildError::MergeUnknown {
                                index: rank,
                                message: format!(
                                    "merge {rank} names {:?}, which is not in the vocabulary",
                                    String::from_utf8_lossy(part)
                                ),
                            })
                    };
                    let a = lookup(left)?;
                    let b = lookup(right)?;
                    joined.clear();
                    joined.extend_from_slice(left);
                    joined.extend_from_slice(right);
                    let new_id = lookup(&joined)?;
                    merges
                        .entry(pair_key(a, b))
                        .or_insert(((rank as u64) << 32) | new_id as u64);
                }
            }
        }

        let mut bpe = Bpe {
            tokens,
            defined,
            short: FxHashMap::default(),
            whole: FxHashMap::default(),
            byte_ids,
            byte_pairs: Box::default(),
            merges,
        };
        let pairs: Vec<u64> = (0..65536usize)
            .map(|i| bpe.rank(bpe.byte_ids[i >> 8], bpe.byte_ids[i & 0xff]))
            .collect();
        bpe.byte_pairs = pairs.into_boxed_slice();
        if tiktoken_style || spec.ignore_merges {
            bpe.whole = by_bytes;
        } else {
            // Keep only tokens that merging their own bytes reproduces.
            let mut scratch = Scratch::default();
            let mut whole = FxHashMap::default();
            whole.reserve(by_bytes.len());
            for (bytes, id) in by_bytes {
                if bytes.len() == 1 || bpe.merge_count(&bytes, &mut scratch) == 1 {
                    whole.insert(bytes, id);
                }
            }
            bpe.whole = whole;
        }
        let whole = std::mem::take(&mut bpe.whole);
        let (short, long): (Vec<_>, Vec<_>) = whole.into_iter().partition(|(b, _)| b.len() <= 7);
        bpe.short = short
            .into_iter()
            .filter_map(|(b, id)| short_key(&b).map(|k| (k, id)))
            .collect();
        bpe.whole = long.into_iter().collect();
        Ok(bpe)
    }

    pub fn vocab_size(&self) -> usize {
        self.defined.iter().filter(|d| **d).count()
    }

    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        match self.defined.get(id as usize) {
            Some(true) => Some(&self.tokens[id as usize]),
            _ => None,
        }
    }

    /// The id of a byte string that is exactly one token (and that BPE reaches), if any.
    #[inline]
    pub fn token_id(&self, bytes: &[u8]) -> Option<u32> {
        match short_key(bytes) {
            Some(k) => self.short.get(&k).copied(),
            None => self.whole.get(bytes).copied(),
        }
    }

    #[inline]
    fn rank(&self, a: u32, b: u32) -> u64 {
        match self.merges.get(&pair_key(a, b)) {
            Some(&v) => v,
            None => u64::MAX,
        }
    }

    /// Number of tokens in one piece.
    #[inline]
    pub fn count_piece(&self, piece: &[u8], scratch: &mut Scratch) -> usize {
        if piece.len() <= 1 {
            return piece.len();
        }
        if self.token_id(piece).is_some() {
            return 1;
        }
        self.merge_count(piece, scratch)
    }

    /// Appends the ids of one piece to `out`.
    pub fn encode_piece(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        if let Some(id) = self.token_id(piece) {
            out.push(id);
            return;
        }
        if piece.len() > LONG_PIECE {
            self.merge_heap(piece, scratch);
            let mut i = 0;
            while i != NONE {
                out.push(scratch.nodes[i].id);
                i = scratch.nodes[i].next;
            }
        } else {
            self.merge_flat(piece, scratch);
            out.extend_from_slice(&scratch.ids);
        }
    }

    /// Merges a piece that is not a whole token; returns its token count.
    pub fn merge_count(&self, piece: &[u8], scratch: &mut Scratch) -> usize {
        if piece.len() > LONG_PIECE {
            self.merge_heap(piece, scratch)
        } else {
            self.merge_flat(piece, scratch);
            scratch.ids.len()
        }
    }

    #[inline]
    fn byte_pair(&self, a: u8, b: u8) -> u64 {
        self.byte_pairs[((a as usize) << 8) | b as usize]
    }

    /// Flat merge: `parts[i]` is (merge value of symbols i and i+1, symbol i); one array so a
    /// merge moves memory once.
    fn merge_flat(&self, piece: &[u8], s: &mut Scratch) {
        s.parts.clear();
        for w in piece.windows(2) {
            s.parts
                .push((self.byte_pair(w[0], w[1]), self.byte_ids[w[0] as usize]));
        }
        if let Some(&last) = piece.last() {
            s.parts.push((u64::MAX, self.byte_ids[last as usize]));
        }
        let parts = &mut s.parts;
        loop {
            // Leftmost minimum (the last entry's value is always MAX).
            let mut best = u64::MAX;
            let mut at = usize::MAX;
            for (i, &(r, _)) in parts.iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if at == usize::MAX {
                break;
            }
            parts[at].1 = best as u32;
            parts.remove(at + 1);
            if at + 1 < parts.len() {
                parts[at].0 = self.rank(parts[at].1, parts[at + 1].1);
            } else {
                parts[at].0 = u64::MAX;
            }
            if at > 0 {
                parts[at - 1].0 = self.rank(parts[at - 1].1, parts[at].1);
            }
        }
        s.ids.clear();
        s.ids.extend(parts.iter().map(|&(_, id)| id));
    }

    /// Heap merge over a doubly linked list; returns the number of symbols left. The survivors
    /// are reachable from node 0 through `next`.
    fn merge_heap(&self, piece: &[u8], s: &mut Scratch) -> usize {
        let n = piece.len();
        s.nodes.clear();
        s.heap.clear();
        for (i, &b) in piece.iter().enumerate() {
            s.nodes.push(Node {
                id: self.byte_ids[b as usize],
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
                alive: true,
            });
        }
        for i in 0..n - 1 {
            let r = self.byte_pair(piece[i], piece[i + 1]);
            if r != u64::MAX {
                s.heap
                    .push(Reverse((r >> 32, i, r as u32, s.nodes[i + 1].id)));
            }
        }
        let mut count = n;
        while let Some(Reverse((rank, left, new_id, right_id))) = s.heap.pop() {
            // Stale entries: the left symbol died, or its right neighbour changed since.
            if !s.nodes[left].alive {
                continue;
            }
            let right = s.nodes[left].next;
            if right == NONE || s.nodes[right].id != right_id || !s.nodes[right].alive {
                continue;
            }
            let expected = self.rank(s.nodes[left].id, right_id);
            // The entry is valid exactly when it describes the current pair's merge.
            if expected == u64::MAX || expected as u32 != new_id || expected >> 32 != rank {
                continue;
            }
            s.nodes[left].id = new_id;
            s.nodes[right].alive = false;
            let after = s.nodes[right].next;
            s.nodes[left].next = after;
            if after != NONE {
                s.nodes[after].prev = left;
            }
            count -= 1;
            let prev = s.nodes[left].prev;
            if prev != NONE {
                let r = self.rank(s.nodes[prev].id, new_id);
                if r != u64::MAX {
                    s.heap.push(Reverse((r >> 32, prev, r as u32, new_id)));
                }
            }
            if after != NONE {
                let r = self.rank(new_id, s.nodes[after].id);
                if r != u64::MAX {
                    s.heap
                        .push(Reverse((r >> 32, left, r as u32, s.nodes[after].id)));
                }
            }
        }
        count
    }
}

const NONE: usize = usize::MAX;

struct Node {
    id: u32,
    prev: usize,
    next: usize,
    alive: bool,
}

/// Reusable buffers, one per counting call (or per thread in batch mode).
#[derive(Default)]
pub struct Scratch {
    ids: Vec<u32>,
    parts: Vec<(u64, u32)>,
    nodes: Vec<Node>,
    heap: BinaryHeap<Reverse<(u64, usize, u32, u32)>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Bpe {
        // bytes as tokens 0..=255, then "ab"=256, "abc"=257, "aa"=258
        let mut vocab: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
        vocab.push((b"ab".to_vec(), 256));
        vocab.push((b"abc".to_vec(), 257));
        vocab.push((b"aa".to_vec(), 258));
        match Bpe::new(BpeSpec {
            vocab,
            merges: None,
            ignore_merges: false,
        }) {
            Ok(b) => b,
            Err(_) => panic!("toy vocabulary must build"),
        }
    }

    #[test]
    fn merges_by_rank_leftmost_first() {
        let bpe = toy();
        let mut s = Scratch::default();
        let mut out = Vec::new();
        bpe.encode_piece(b"abcaaa", &mut s, &mut out);
        assert_eq!(out, vec![257, 258, b'a' as u32]);
        assert_eq!(bpe.count_piece(b"abcaaa", &mut s), 3);
    }

    #[test]
    fn heap_and_flat_agree_on_long_runs() {
        let bpe = toy();
        let mut s = Scratch::default();
        let text: Vec<u8> = b"abcaab".iter().cycle().take(1000).copied().collect();
        bpe.merge_flat(&text, &mut s);
        let flat = s.ids.clone();
        let n = bpe.merge_heap(&text, &mut s);
        let mut heap = Vec::new();
        let mut i = 0;
        while i != NONE {
            heap.push(s.nodes[i].id);
            i = s.nodes[i].next;
        }
        assert_eq!(n, heap.len());
        assert_eq!(flat, heap);
    }
}
