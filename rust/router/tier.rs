//! Tiers: a model id such as `auto` sends each request to a cheap or a strong tier by a
//! complexity score computed from cheap features of the prompt.
//!
//! # Features
//!
//! [`TierScorer::features`] reads the text once with an Aho-Corasick automaton (ASCII
//! case-insensitive, overlapping matches, so a configured keyword that is also a built-in marker
//! counts as both) and once byte by byte for symbols, both linear and allocation-free:
//! - code markers: fences, `def `, `function`, `#include`, `class `, `import `, `=>`, `std::` ...
//!   and the density of `{`, `}` and `;` (braces-and-semicolons per byte);
//! - math markers: `\frac`, `\sum`, `\int`, "solve", "prove", "equation", "integral" ... and
//!   every `digit op digit` (op in `+ - * / ^ = < >`, spaces allowed between);
//! - the configured keywords;
//! - from the caller: prompt tokens, conversation depth (prior turns), whether tools are offered.
//!
//! # Score
//!
//! A capped linear combination, each term first scaled to [0, 1]:
//!
//! ```text
//! length   = ln(1 + prompt_tokens) / ln(1 + 8192)    (capped at 1: 8k tokens is "long")
//! depth    = depth / 10                              (capped)
//! tools    = 1 if tools are offered
//! code     = code_markers / 3 + 20 * symbols / bytes (capped: 3 markers or 5% symbols)
//! math     = math_markers / 3                        (capped)
//! keywords = keyword_hits / 2                        (capped)
//! score    = min(1, sum of weight x term)
//! ```
//!
//! Default weights ([`Weights::default`]): length 0.35, depth 0.15, tools 0.15, code 0.4, math
//! 0.4, keywords 0.5. With the default threshold of 0.5, small talk scores ~0.1, a code or
//! math question of some length ~0.6-1, and a long plain prompt alone stays cheap. Linear rather
//! than logistic so that an operator can read a score and the weights and see why; the cap keeps
//! it in [0, 1].
//!
//! # Contracts
//!
//! A tenant's contract may forbid the strong tier (`allow_strong = false`) or cap its share
//! (`max_strong_share`). The scorer keeps the share per contract holder itself (keyed by the
//! xxh3 hash of the holder's name, `None` sharing one anonymous counter): each capped decision
//! counts one, and a request that wants strong gets it only if strong decisions, itself
//! included, stay within `max_strong_share` of all decisions, so the observed share never
//! exceeds the cap at any point. Counters halve when a holder reaches 2^16 decisions, so the
//! share is over roughly the last 32k-64k decisions rather than all time (a quiet month does not
//! bank strong calls for a burst). At most [`MAX_HOLDERS`] holders are tracked; beyond that the
//! table is cleared (shares restart, which can only let a holder back to its cap).
//!
//! Performance notes:
//! - The automaton is built once per scorer, as a DFA (the default NFA measured ~10% slower
//!   here); a 2 KB prompt scores in ~4.1 µs (~2 ns per byte), most of it the case-insensitive
//!   overlapping scan. Keywords are matched case-insensitively on ASCII only, which keeps the
//!   automaton a DFA over bytes.
//! - The symbol and digit-operator scan classifies bytes through a 256-entry table and
//!   branches only on the rare non-"other" bytes: a branch-free walk of the state table was
//!   slower (7.2 vs 4.4 µs for the whole score: its state is a serial chain of loads).

use super::error::{Result, RouterError};
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use std::collections::HashMap;

/// Built-in code markers (matched case-insensitively).
const CODE_MARKERS: &[&str] = &[
    "```", "def ", "function", "#include", "class ", "import ", "return ", "=>", "std::",
    "console.", "println", "select ", "fn ", "const ", "#!/",
];
/// Built-in math markers (matched case-insensitively).
const MATH_MARKERS: &[&str] = &[
    "\\frac",
    "\\sum",
    "\\int",
    "\\sqrt",
    "solve",
    "prove",
    "proof",
    "theorem",
    "equation",
    "integral",
    "derivative",
    "lemma",
];
const C_OTHER: u8 = 0;
const C_SYMBOL: u8 = 1;
const C_DIGIT: u8 = 2;
const C_OP: u8 = 3;
const C_SPACE: u8 = 4;

const BYTE_CLASS: [u8; 256] = {
    let mut t = [C_OTHER; 256];
    t[b'{' as usize] = C_SYMBOL;
    t[b'}' as usize] = C_SYMBOL;
    t[b';' as usize] = C_SYMBOL;
    let mut d = b'0';
    while d <= b'9' {
        t[d as usize] = C_DIGIT;
        d += 1;
    }
    let ops = *b"+-*/^=<>";
    let mut i = 0;
    while i < ops.len() {
        t[ops[i] as usize] = C_OP;
        i += 1;
    }
    t[b' ' as usize] = C_SPACE;
    t
};

/// `NEXT_STATE[state][class]` of the digit-operator-digit scanner (spaces keep the state).
const NEXT_STATE: [[u8; 5]; 3] = [
    // other, symbol, digit, op, space
    [0, 0, 1, 0, 0],
    [0, 0, 1, 2, 1],
    [0, 0, 1, 0, 2],
];

/// Most contract holders whose share is tracked at once.
pub const MAX_HOLDERS: usize = 65_536;
/// A holder's counters halve when its decisions reach this.
const SHARE_HALVE_AT: u64 = 1 << 16;

/// Weights of the score's terms (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    pub prompt_tokens: f64,
    pub depth: f64,
    pub tools: f64,
    pub code: f64,
    pub math: f64,
    pub keywords: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            prompt_tokens: 0.35,
            depth: 0.15,
            tools: 0.15,
            code: 0.4,
            math: 0.4,
            keywords: 0.5,
        }
    }
}

impl Weights {
    pub const NAMES: [&'static str; 6] = [
        "prompt_tokens",
        "depth",
        "tools",
        "code",
        "math",
        "keywords",
    ];

    /// Sets one weight by name (from configuration).
    pub fn set(&mut self, name: &str, value: f64) -> Result<()> {
        if !(value.is_finite() && value >= 0.0) {
            return Err(RouterError::Invalid(format!(
                "tier weight {name:?} must be a finite number >= 0, got {value}"
            )));
        }
        let slot = match name {
            "prompt_tokens" => &mut self.prompt_tokens,
            "depth" => &mut self.depth,
            "tools" => &mut self.tools,
            "code" => &mut self.code,
            "math" => &mut self.math,
            "keywords" => &mut self.keywords,
            _ => {
                return Err(RouterError::Invalid(format!(
                    "unknown tier weight {name:?} (expected one of {})",
                    Weights::NAMES.join(", ")
                )))
            }
        };
        *slot = value;
        Ok(())
    }
}

/// What the scorer reads from one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub prompt_tokens: u32,
    pub depth: u32,
    pub tools: bool,
    pub code_markers: u32,
    /// `{`, `}` and `;` in the text.
    pub symbols: u32,
    pub math_markers: u32,
    pub keyword_hits: u32,
    /// Length of the text in bytes (the denominator of the symbol density).
    pub bytes: u32,
}

/// A tenant's terms for the strong tier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Contract {
    pub allow_strong: bool,
    /// At most this share of the holder's decisions may be strong (0..=1; `None`: no cap).
    pub max_strong_share: Option<f64>,
}

impl Default for Contract {
    fn default() -> Self {
        Contract {
            allow_strong: true,
            max_strong_share: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Cheap,
    Strong,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Cheap => "cheap",
            Tier::Strong => "strong",
        }
    }
}

/// Scores requests and assigns tiers (see the module docs).
#[derive(Clone, Debug)]
pub struct TierScorer {
    threshold: f64,
    weights: Weights,
    keywords: Vec<String>,
    ac: AhoCorasick,
    /// (strong, total) decisions per holder hash.
    shares: HashMap<u64, (u64, u64)>,
}

impl TierScorer {
    pub fn new(threshold: f64, weights: Weights, keywords: Vec<String>) -> Result<TierScorer> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(RouterError::Invalid(format!(
                "threshold must be within [0, 1], got {threshold}"
            )));
        }
        if let Some(k) = keywords.iter().find(|k| k.is_empty()) {
            return Err(RouterError::Invalid(format!(
                "tier keywords must not be empty, got {k:?}"
            )));
        }
        let patterns = CODE_MARKERS
            .iter()
            .chain(MATH_MARKERS)
            .map(|s| s.as_bytes())
            .chain(keywords.iter().map(|s| s.as_bytes()));
        let ac = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .kind(Some(AhoCorasickKind::DFA))
            .build(patterns)
            .map_err(|e| RouterError::Invalid(format!("tier keywords: {e}")))?;
        Ok(TierScorer {
            threshold,
            weights,
            keywords,
            ac,
            shares: HashMap::new(),
        })
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    pub fn keywords(&self) -> &[String] {
        &self.keywords
    }

    pub fn features(&self, text: &str, depth: u32, tools: bool, prompt_tokens: u32) -> Features {
        let mut f = Features {
            prompt_tokens,
            depth,
            tools,
            bytes: text.len().min(u32::MAX as usize) as u32,
            ..Features::default()
        };
        let (n_code, n_math) = (CODE_MARKERS.len(), MATH_MARKERS.len());
        for m in self.ac.find_overlapping_iter(text) {
            let p = m.pattern().as_usize();
            if p < n_code {
                f.code_markers += 1;
            } else if p < n_code + n_math {
                f.math_markers += 1;
            } else {
                f.keyword_hits += 1;
            }
        }
        // digit [spaces] op [spaces] digit, counted once per operator; and the symbols. Most
        // bytes are "other", a well-predicted branch; a branch-free table walk measured slower
        // (its state is a serial chain of loads).
        let mut state = 0u8; // 0: nothing, 1: after a digit, 2: after digit + operator
        for &b in text.as_bytes() {
            let class = BYTE_CLASS[b as usize];
            if class == C_OTHER {
                state = 0;
                continue;
            }
            f.symbols += u32::from(class == C_SYMBOL);
            f.math_markers += u32::from(state == 2 && class == C_DIGIT);
            state = NEXT_STATE[state as usize][class as usize];
        }
        f
    }

    /// The complexity score in [0, 1].
    pub fn score(&self, f: &Features) -> f64 {
        let w = &self.weights;
        let length = ((1.0 + f.prompt_tokens as f64).ln() / (1.0 + 8192f64).ln()).min(1.0);
        let depth = (f.depth as f64 / 10.0).min(1.0);
        let tools = if f.tools { 1.0 } else { 0.0 };
        let density = if f.bytes == 0 {
            0.0
        } else {
            20.0 * f.symbols as f64 / f.bytes as f64
        };
        let code = (f.code_markers as f64 / 3.0 + density).min(1.0);
        let math = (f.math_markers as f64 / 3.0).min(1.0);
        let keywords = (f.keyword_hits as f64 / 2.0).min(1.0);
        let s = w.prompt_tokens * length
            + w.depth * depth
            + w.tools * tools
            + w.code * code
            + w.math * math
            + w.keywords * keywords;
        s.clamp(0.0, 1.0)
    }

    pub fn score_text(&self, text: &str, depth: u32, tools: bool, prompt_tokens: u32) -> f64 {
        self.score(&self.features(text, depth, tools, prompt_tokens))
    }

    /// The tier of a request with this score under `contract`, for `holder` (a hash of the
    /// tenant's name; see [`holder_key`]). Counts the decision against the holder's share when
    /// the contract caps it.
    pub fn tier(&mut self, score: f64, contract: Contract, holder: u64) -> Result<Tier> {
        let wants = score >= self.threshold;
        if !contract.allow_strong {
            return Ok(Tier::Cheap);
        }
        let Some(cap) = contract.max_strong_share else {
            return Ok(if wants { Tier::Strong } else { Tier::Cheap });
        };
        if !(0.0..=1.0).contains(&cap) {
            return Err(RouterError::Invalid(format!(
                "max_strong_share must be within [0, 1], got {cap}"
            )));
        }
        if self.shares.len() >= MAX_HOLDERS && !self.shares.contains_key(&holder) {
            self.shares.clear();
        }
        let (strong, total) = self.shares.entry(holder).or_insert((0, 0));
        if *total >= SHARE_HALVE_AT {
            *strong /= 2;
            *total /= 2;
        }
        *total += 1;
        if wants && (*strong + 1) as f64 <= cap * *total as f64 {
            *strong += 1;
            Ok(Tier::Strong)
        } else {
            Ok(Tier::Cheap)
        }
    }

    /// (strong, total) capped decisions counted for `holder` (after any halving).
    pub fn share(&self, holder: u64) -> (u64, u64) {
        self.shares.get(&holder).copied().unwrap_or((0, 0))
    }
}

/// The key a holder's share is kept under: xxh3 of its name, 0 for "no holder".
pub fn holder_key(name: Option<&str>) -> u64 {
    name.map_or(0, |n| xxhash_rust::xxh3::xxh3_64(n.as_bytes()) | 1)
}
