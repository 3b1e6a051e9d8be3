//! The meter: exact token counting for tiktoken and HuggingFace byte-level BPE vocabularies.
//!
//! Pipeline for one text: optional NFC normalization, then (HF only) the vocabulary's
//! non-special added tokens are cut out whole, then the rest is pre-tokenized and each piece is
//! counted with BPE. Special tokens (`<|endoftext|>`, `<|im_start|>`, ...) are never matched in
//! text: text that looks like one is counted as the plain text it is.
//!
//! Performance notes:
//! - Counting allocates nothing per piece: one reusable [`bpe::Scratch`] per call.
//! - [`TextCache`] lets a conversation be recounted for the cost of its new messages: entries
//!   are keyed by a 128-bit hash of the text (hashing runs at several GB/s, counting at tens of
//!   MB/s), and only texts of at least [`CACHE_MIN_BYTES`] bytes are cached.

pub mod bpe;
pub mod error;
pub mod load;
pub mod pretok;
pub mod scan;

use aho_corasick::{AhoCorasick, MatchKind};
use bpe::{Bpe, BpeSpec, Scratch};
pub use error::{MeterError, Result};
use pretok::Pretokenizer;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::sync::Mutex;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// From this size on, `count` remembers the pieces it had to merge, for the rest of the call.
const MISS_CACHE_MIN_BYTES: usize = 4096;
/// Texts shorter than this are counted directly; caching them would cost more than it saves.
pub const CACHE_MIN_BYTES: usize = 64;
/// Most entries the per-meter cache holds (two generations of half this each); an entry is a
/// 16-byte key and a 4-byte count, so the cache stays under ~4 MB including table overhead.
pub const CACHE_MAX_ENTRIES: usize = 1 << 16;

/// A piece of pre-tokenized text, or an added token matched whole.
#[derive(Clone, Copy)]
pub enum Segment<'t> {
    Piece(&'t str),
    Added(&'t str, u32),
}

impl<'t> Segment<'t> {
    fn text(&self) -> &'t str {
        match self {
            Segment::Piece(s) | Segment::Added(s, _) => s,
        }
    }
}

struct Fast {
    pretok: Pretokenizer,
    bpe: Bpe,
    nfc: bool,
    added: Option<(AhoCorasick, Vec<u32>)>,
    /// Longest added token in bytes (0 without added tokens).
    added_max_len: usize,
    /// ids of added and special tokens -> their text, for decoding.
    extra: FxHashMap<u32, String>,
}

enum Engine {
    Fast(Box<Fast>),
    Fallback(Box<tokenizers::Tokenizer>),
}

pub struct Meter {
    engine: Engine,
    cache: TextCache,
    /// Why the `tokenizers` fallback serves this vocabulary, when it does.
    fallback_reason: Option<String>,
    /// `get_vocab_size` builds a map on every call: computed once.
    fallback_vocab_size: usize,
    /// Longest non-special added token of a fallback vocabulary, in bytes.
    fallback_added_max_len: usize,
}

impl Meter {
    /// A tiktoken vocabulary: rank file, pattern, special tokens (decoded, never matched).
    pub fn from_tiktoken_file(
        path: &str,
        pattern: &str,
        special_tokens: &[(String, u32)],
        nfc: bool,
    ) -> Result<Self> {
        let data = load::read_file(path)?;
        let vocab = load::parse_tiktoken(path, &data)?;
        let bpe = Bpe::new(BpeSpec {
            vocab,
            merges: None,
            ignore_merges: false,
        })
        .map_err(|e| load::bpe_error(path, e))?;
        let pretok = Pretokenizer::tiktoken(pattern)?;
        let extra = special_tokens
            .iter()
            .map(|(s, id)| (*id, s.clone()))
            .collect();
        Ok(Self::fast(Fast {
            pretok,
            bpe,
            nfc,
            added: None,
            added_max_len: 0,
            extra,
        }))
    }

    /// A HuggingFace `tokenizer.json`. `force_fallback` serves it with the `tokenizers` crate
    /// even when the fast path could (for testing and comparison).
    pub fn from_tokenizer_json_file(path: &str, force_fallback: bool) -> Result<Self> {
        let data = load::read_file(path)?;
        let (_, loaded) = load::parse_tokenizer_json(path, &data)?;
        match loaded {
            load::JsonLoad::Fast(v) if !force_fallback => {
                let v = *v;
                let added = if v.added.is_empty() {
                    None
                } else {
                    let ac = AhoCorasick::builder()
                        .match_kind(MatchKind::LeftmostLongest)
                        .build(v.added.iter().map(|(s, _)| s.as_str()))
                        .map_err(|e| MeterError::Tokenizer(e.to_string()))?;
                    Some((ac, v.added.iter().map(|(_, id)| *id).collect()))
                };
                let extra = v
                    .added
                    .iter()
                    .chain(v.special.iter())
                    .map(|(s, id)| (*id, s.clone()))
                    .collect();
                let added_max_len = v.added.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
                Ok(Self::fast(Fast {
                    pretok: v.pretokenizer,
                    bpe: v.bpe,
                    nfc: v.nfc,
                    added,
                    added_max_len,
                    extra,
                }))
            }
            other => {
                let reason = match other {
                    load::JsonLoad::Fallback(r) => r,
                    load::JsonLoad::Fast(_) => "forced".to_owned(),
                };
                let mut tok =
                    tokenizers::Tokenizer::from_bytes(&data).map_err(|e| MeterError::Corrupt {
                        path: path.to_owned(),
                        line: None,
                        message: e.to_string(),
                    })?;
                // Special tokens in user text are plain text, as on the fast path.
                tok.set_encode_special_tokens(true);
                let fallback_vocab_size = tok.get_vocab_size(true);
                let fallback_added_max_len = tok
                    .get_added_tokens_decoder()
                    .values()
                    .filter(|t| !t.special)
                    .map(|t| t.content.len())
                    .max()
                    .unwrap_or(0);
                Ok(Meter {
                    engine: Engine::Fallback(Box::new(tok)),
                    cache: TextCache::new(),
                    fallback_reason: Some(reason),
                    fallback_vocab_size,
                    fallback_added_max_len,
                })
            }
        }
    }

    fn fast(f: Fast) -> Self {
        Meter {
            engine: Engine::Fast(Box::new(f)),
            cache: TextCache::new(),
            fallback_reason: None,
            fallback_vocab_size: 0,
            fallback_added_max_len: 0,
        }
    }

    /// Why this vocabulary is served by the `tokenizers` crate, or None on the fast path.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    pub fn vocab_size(&self) -> usize {
        match &self.engine {
            Engine::Fast(f) => f.bpe.vocab_size() + f.extra.len(),
            Engine::Fallback(_) => self.fallback_vocab_size,
        }
    }

    /// Calls `f` with each segment of `text` (already normalized by the caller): the
    /// non-special added tokens matched whole, and the pre-tokenized pieces between them.
    fn segments<'t, F: FnMut(Segment<'t>)>(fast: &Fast, text: &'t str, f: &mut F) {
        match &fast.added {
            None => fast.pretok.for_each(text, &mut |p| f(Segment::Piece(p))),
            Some((ac, ids)) => {
                let mut at = 0;
                for m in ac.find_iter(text) {
                    fast.pretok
                        .for_each(&text[at..m.start()], &mut |p| f(Segment::Piece(p)));
                    f(Segment::Added(
                        &text[m.start()..m.end()],
                        ids[m.pattern().as_usize()],
                    ));
                    at = m.end();
                }
                fast.pretok
                    .for_each(&text[at..], &mut |p| f(Segment::Piece(p)));
            }
        }
    }

    fn normalize<'t>(fast: &Fast, text: &'t str) -> Cow<'t, str> {
        if fast.nfc && is_nfc_quick(text.chars()) != IsNormalized::Yes {
            Cow::Owned(text.nfc().collect())
        } else {
            Cow::Borrowed(text)
        }
    }

    /// The exact number of tokens in `text`.
    pub fn count(&self, text: &str) -> usize {
        match &self.engine {
            Engine::Fast(fast) => {
                let text = Self::normalize(fast, text);
                let mut scratch = Scratch::default();
                let mut n = 0;
                if text.len() < MISS_CACHE_MIN_BYTES {
                    Self::segments(fast, &text, &mut |seg| {
                        n += match seg {
                            Segment::Piece(p) => fast.bpe.count_piece(p.as_bytes(), &mut scratch),
                            Segment::Added(..) => 1,
                        }
                    });
                } else {
                    // Pieces that are not one token repeat (identifiers, rare words): merge
                    // each distinct one once per call.
                    let mut misses: FxHashMap<&str, u32> = FxHashMap::default();
                    Self::segments(fast, &text, &mut |seg| {
                        n += match seg {
                            Segment::Piece(p) if p.len() > 1 => {
                                if fast.bpe.token_id(p.as_bytes()).is_some() {
                                    1
                                } else if let Some(&c) = misses.get(p) {
                                    c as usize
                                } else {
                                    let c = fast.bpe.merge_count(p.as_bytes(), &mut scratch);
                                    misses.insert(p, c as u32);
                                    c
                                }
                            }
                            Segment::Piece(p) => p.len(),
                            Segment::Added(..) => 1,
                        }
                    });
                }
                n
            }
            Engine::Fallback(tok) => tok.encode_fast(text, false).map(|e| e.len()).unwrap_or(0),
        }
    }

    /// The token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.engine {
            Engine::Fast(fast) => {
                let text = Self::normalize(fast, text);
                let mut scratch = Scratch::default();
                let mut out = Vec::with_capacity(text.len() / 3);
                Self::segments(fast, &text, &mut |seg| match seg {
                    Segment::Piece(p) => {
                        fast.bpe.encode_piece(p.as_bytes(), &mut scratch, &mut out)
                    }
                    Segment::Added(_, id) => out.push(id),
                });
                Ok(out)
            }
            Engine::Fallback(tok) => tok
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| MeterError::Tokenizer(e.to_string())),
        }
    }

    /// The bytes that `ids` stand for (for a fallback vocabulary: its decoder's text).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match &self.engine {
            Engine::Fast(fast) => {
                let mut out = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    if let Some(b) = fast.bpe.token_bytes(id) {
                        out.extend_from_slice(b);
                    } else if let Some(s) = fast.extra.get(&id) {
                        out.extend_from_slice(s.as_bytes());
                    } else {
                        return Err(MeterError::UnknownId(id));
                    }
                }
                Ok(out)
            }
            Engine::Fallback(tok) => {
                let size = self.fallback_vocab_size as u32;
                if let Some(&bad) = ids
                    .iter()
                    .find(|&&id| tok.id_to_token(id).is_none() || id >= size)
                {
                    return Err(MeterError::UnknownId(bad));
                }
                tok.decode(ids, false)
                    .map(String::into_bytes)
                    .map_err(|e| MeterError::Tokenizer(e.to_string()))
            }
        }
    }

    /// Counts of many texts, spread over all cores.
    pub fn count_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<usize> {
        texts.par_iter().map(|t| self.count(t.as_ref())).collect()
    }

    /// Like [`Meter::count`], but remembers counts of longer texts in a bounded cache keyed by
    /// their content, so that recounting a growing conversation only counts what is new.
    pub fn count_cached(&self, text: &str) -> usize {
        if text.len() < CACHE_MIN_BYTES {
            return self.count(text);
        }
        let key = xxhash_rust::xxh3::xxh3_128(text.as_bytes());
        if let Some(n) = self.cache.get(key) {
            return n as usize;
        }
        let n = self.count(text);
        self.cache.put(key, n as u32);
        n
    }

    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// A new incremental counter for streamed text.
    pub fn stream(&self) -> StreamState {
        StreamState {
            tail: String::new(),
            committed: 0,
        }
    }
}

/// Incremental counting of streamed text: after any split of a text into deltas, the total
/// equals the count of the whole text.
///
/// Only the last [`STREAM_KEEP`] segments can still change when text is appended (a piece such
/// as `'l` becomes `'ll`, a whitespace run is re-split by what follows), so everything before
/// them is counted once and dropped; each feed costs O(delta + the kept tail), never a recount.
pub struct StreamState {
    tail: String,
    committed: usize,
}

/// Segments kept uncommitted at the end of a stream.
pub const STREAM_KEEP: usize = 2;

impl StreamState {
    pub fn total(&self, meter: &Meter) -> usize {
        self.committed + meter.count(&self.tail)
    }

    /// Appends `delta` and returns the running total.
    pub fn feed(&mut self, meter: &Meter, delta: &str) -> usize {
        self.tail.push_str(delta);
        match &meter.engine {
            Engine::Fast(fast) => {
                if fast.nfc && is_nfc_quick(self.tail.chars()) != IsNormalized::Yes {
                    // NFC(NFC(a) + b) == NFC(a + b): the tail may be normalized on its own.
                    self.tail = self.tail.nfc().collect();
                }
                let base = self.tail.as_ptr() as usize;
                let mut starts: Vec<usize> = Vec::new();
                let mut cut_counts: Vec<usize> = Vec::new();
                let mut scratch = Scratch::default();
                let mut running = 0usize;
                Meter::segments(fast, &self.tail, &mut |seg| {
                    starts.push(seg.text().as_ptr() as usize - base);
                    cut_counts.push(running);
                    running += match seg {
                        Segment::Piece(p) => fast.bpe.count_piece(p.as_bytes(), &mut scratch),
                        Segment::Added(..) => 1,
                    };
                });
                if starts.len() > STREAM_KEEP {
                    let mut k = starts.len() - STREAM_KEEP;
                    // The end of the tail may be the start of an added token still arriving
                    // ("<｜Us" before "er｜>"): keep its bytes uncommitted until it is whole.
                    let limit = self
                        .tail
                        .len()
                        .saturating_sub(fast.added_max_len.saturating_sub(1));
                    while k > 0 && starts[k] > limit {
                        k -= 1;
                    }
                    self.committed += cut_counts[k];
                    self.tail.drain(..starts[k]);
                    running -= cut_counts[k];
                }
                self.committed + running
            }
            Engine::Fallback(tok) => {
                // `encode` (not `encode_fast`): the commit point needs the tokens' offsets.
                let Ok(enc) = tok.encode(self.tail.as_str(), false) else {
                    return self.committed;
                };
                let words = enc.get_word_ids();
                let offsets = enc.get_offsets();
                let n = enc.len();
                // Commit the tokens before a word start that has at least STREAM_KEEP words
                // after it and lies before anything that may begin an added token (as on the
                // fast path); the latest such start.
                let limit = self
                    .tail
                    .len()
                    .saturating_sub(meter.fallback_added_max_len.saturating_sub(1));
                let mut seen = 0;
                let mut last: Option<Option<u32>> = None;
                for i in (0..n).rev() {
                    if last == Some(words[i]) {
                        continue;
                    }
                    seen += 1;
                    last = Some(words[i]);
                    // Token i + 1 starts the word after this one.
                    if seen <= STREAM_KEEP || i + 1 >= n {
                        continue;
                    }
                    let t = i + 1;
                    let byte = offsets[t].0;
                    if byte > 0 && byte <= limit && self.tail.is_char_boundary(byte) {
                        self.committed += t;
                        self.tail.drain(..byte);
                        return self.committed + (n - t);
                    }
                }
                self.committed + n
            }
        }
    }
}

/// A bounded content-keyed cache of counts: two generations, the older dropped when the newer
/// fills, so recently used entries survive and memory never exceeds [`CACHE_MAX_ENTRIES`].
struct TextCache {
    inner: Mutex<(FxHashMap<u128, u32>, FxHashMap<u128, u32>)>,
}

impl TextCache {
    fn new() -> Self {
        TextCache {
            inner: Mutex::new((FxHashMap::default(), FxHashMap::default())),
        }
    }

    fn get(&self, key: u128) -> Option<u32> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&v) = g.0.get(&key) {
            return Some(v);
        }
        let v = g.1.get(&key).copied()?;
        Self::insert(&mut g, key, v);
        Some(v)
    }

    fn put(&self, key: u128, value: u32) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::insert(&mut g, key, value);
    }

    fn insert(g: &mut (FxHashMap<u128, u32>, FxHashMap<u128, u32>), key: u128, value: u32) {
        if g.0.len() >= CACHE_MAX_ENTRIES / 2 {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(key, value);
    }

    fn len(&self) -> usize {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.len() + g.1.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    const CL100K: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

    /// A small tiktoken vocabulary: every byte, plus a few merges, written to a temp file.
    fn toy_meter() -> Meter {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for t in [
            "he", "ll", "llo", "hello", " w", " wor", " world", "  ", "'l", "'ll", "12", "123",
        ] {
            tokens.push(t.as_bytes().to_vec());
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let body: String = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{} {i}\n", b64.encode(t)))
            .collect();
        let path =
            std::env::temp_dir().join(format!("tokenhub-toy-{}.tiktoken", std::process::id()));
        if std::fs::write(&path, body).is_err() {
            panic!("cannot write the toy vocabulary");
        }
        let specials = vec![("<|endoftext|>".to_owned(), 9999)];
        match Meter::from_tiktoken_file(&path.to_string_lossy(), CL100K, &specials, false) {
            Ok(m) => m,
            Err(e) => panic!("toy vocabulary: {e}"),
        }
    }

    #[test]
    fn counts_encodes_and_decodes() {
        let m = toy_meter();
        let ids = m.encode("hello world").unwrap_or_default();
        assert_eq!(ids.len(), 2);
        assert_eq!(m.count("hello world"), 2);
        assert_eq!(m.decode_bytes(&ids).ok(), Some(b"hello world".to_vec()));
        assert_eq!(
            m.decode_bytes(&[9999]).ok(),
            Some(b"<|endoftext|>".to_vec())
        );
        assert!(matches!(
            m.decode_bytes(&[123_456]),
            Err(MeterError::UnknownId(123_456))
        ));
        // Special-token text is plain text: 13 bytes, no merges among them.
        assert_eq!(m.count("<|endoftext|>"), 13);
    }

    #[test]
    fn stream_total_matches_count_for_every_split() {
        let m = toy_meter();
        for text in [
            "hello world's 12345 'll  \n\n x",
            "'l",
            "a  b\t\t\n  c   ",
            "1234567 hello",
        ] {
            let whole = m.count(text);
            let chars: Vec<char> = text.chars().collect();
            for step in 1..=4 {
                let mut s = m.stream();
                let mut last = 0;
                for chunk in chars.chunks(step) {
                    last = s.feed(&m, &chunk.iter().collect::<String>());
                }
                assert_eq!(last, whole, "text {text:?} fed {step} chars at a time");
                assert_eq!(s.total(&m), whole);
            }
        }
    }

    #[test]
    fn cache_is_bounded_and_content_keyed() {
        let m = toy_meter();
        let long = "hello world ".repeat(10);
        assert_eq!(m.count_cached(&long), m.count(&long));
        assert_eq!(m.cache_len(), 1);
        assert_eq!(m.count_cached(&long), m.count(&long));
        assert_eq!(m.cache_len(), 1);
        for i in 0..(CACHE_MAX_ENTRIES + 100) {
            m.count_cached(&format!("{long}{i}"));
        }
        assert!(m.cache_len() <= CACHE_MAX_ENTRIES);
    }
}
