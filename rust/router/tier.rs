//! Tiers: a model id such as `auto` sends each request to a cheap or a strong tier by a
//! complexity score computed from cheap features of the prompt.
//!
//! # Features
//!
//! [`TierScorer::features`] reads the text once with an Aho-Corasick automaton (ASCII
//! case-insensitive, overlapping matches, so a configured keyword that is also a built-in marker
//! counts as both) and once byte by byte for symbols, both linear and allocation-free:
//! - words (runs of bytes other than space, tab, CR, LF) and commas, counted in the same byte
//!   scan;
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
//! words    = ln(1 + words) / ln(1 + 4096)            (capped)
//! commas   = commas / 10                             (capped)
//! depth    = depth / 10                              (capped)
//! tools    = 1 if tools are offered
//! code     = code_markers / 3 + 20 * symbols / bytes (capped: 3 markers or 5% symbols)
//! math     = math_markers / 3                        (capped)
//! keywords = keyword_hits / 2                        (capped)
//! score    = min(1, sum of weight x term)
//! ```
//!
//! Linear rather than logistic so that an operator can read a score and the weights and see
//! why; the cap keeps it in [0, 1].
//!
//! # Default weights and threshold: how they were chosen
//!
//! [`Weights::default`]: words 0.8, commas 0.2, prompt_tokens 0, math 0 (fitted); code 0.4,
//! keywords 0.5, depth 0.15, tools 0.15 (priors). [`DEFAULT_THRESHOLD`]: 0.48.
//!
//! Fitted on RouteLLM's outcome tables (weak Mixtral-8x7B, strong GPT-4-1106; see
//! `../shared/traces/README.md`), reproduced by `benches/calibrate_tier.py`:
//! - Each of GSM8K and MMLU is split in halves by a hash of the prompt
//!   (`tokenhub.routing_bench.quality.split`); only the fit halves were looked at while fitting.
//! - Target: the gain of the strong model on a prompt (strong - weak correctness: -1, 0, 1),
//!   the quantity APGR rewards ranking by. Non-negative least squares on the terms, centred per
//!   dataset (the score ranks prompts within a workload; it need not tell GSM8K from MMLU), each
//!   dataset weighted equally. Terms chosen by greedy forward selection on two-fold
//!   cross-validation inside the fit halves, from prompt length up: words (CV APGR 0.578 ->
//!   0.585), then commas (0.599); nothing else added 0.002 (tried: math markers, sentences,
//!   negations, parentheses, question marks, digits). With words in, tokens got weight 0.
//!   Math markers got 0: on MMLU they mark questions where GPT-4 gains *less* than average
//!   (fit-half MMLU APGR with the shipped weights 0.579; with math at 0.2, 0.569).
//! - Ratio commas : words = 0.25 (the fit-half APGR optimum is flat from 0.15 to 0.3; NNLS gives
//!   0.28). Scale: words 0.8, so that small talk stays under 0.2 and a 4k-word prompt alone
//!   scores 0.8.
//! - Depth, tools, code and keywords do not vary in these tables (no tool calls, single turns,
//!   no code), so they keep their earlier weights as priors. The code prior costs 0.011 of
//!   fit-half MMLU APGR (0.590 without it: braces of LaTeX and set notation count as code
//!   there) and gains 0.010 on GSM8K.
//! - Threshold: the score at which a quarter of the fit-half prompts would go strong (each
//!   dataset weighted equally; 30% at 0.46, 21% at 0.50). The old defaults sent 1-2.5% strong
//!   at 0.5, which made `auto` "always cheap".
//!
//! Held-out halves (MT-Bench was not used for fitting; whole, 80 prompts, so noisy):
//!
//! ```text
//!                 APGR   CPT(50%) CPT(80%)   at the default threshold
//! GSM8K tier      0.610  35.5%    67.0%      13.9% strong, PGR 0.250
//!   old defaults  0.600  38.3%    67.7%       1.1% strong, PGR 0.026  (threshold 0.5)
//!   prompt length 0.589  37.3%    67.2%
//!   random        0.503  48.9%    79.2%
//! MMLU  tier      0.585  33.8%    70.3%      36.4% strong, PGR 0.518
//!   old defaults  0.549  40.0%    70.0%       2.3% strong, PGR 0.007
//!   prompt length 0.585  35.5%    69.8%
//!   random        0.495  50.5%    80.4%
//! MT-Bench tier   0.618  28.8%    80.5%      38.9% strong, PGR 0.646
//!   old defaults  0.623  25.7%    75.9%       5.6% strong, PGR 0.216
//!   prompt length 0.562  44.4%    72.5%
//!   random        0.517  47.8%    76.5%
//! ```
//!
//! So, plainly: these cheap features beat prompt length on GSM8K (+0.02) and tie it on MMLU,
//! where the scorer stays under the ~0.6 a useful router reaches; most of the signal is length
//! in words, plus commas (more clauses, more quantities to track). The strong share at a given
//! threshold depends on the traffic: prompts of real chat and RAG traffic are much longer than
//! these benchmark questions, so set the threshold from one's own traffic (the
//! `bench-routing --quality` threshold sweep shows the trade-off).
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
//!   here); a 2 KB prompt scores in ~5.0 µs (~2.5 ns per byte), most of it the
//!   case-insensitive overlapping scan. Words and commas cost ~10% (4.5 µs without them, same
//!   machine, same hour); counting word starts on every byte measured 5.4 µs, so the scan
//!   counts the runs of blanks in the rare branch instead and derives the words from them.
//!   Keywords are matched case-insensitively on ASCII only, which keeps the automaton a DFA
//!   over bytes.
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
/// Tab, CR, LF: end a word like a space but, unlike a space, break a `digit op digit`.
const C_BREAK: u8 = 5;
const C_COMMA: u8 = 6;

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
    t[b'\t' as usize] = C_BREAK;
    t[b'\n' as usize] = C_BREAK;
    t[b'\r' as usize] = C_BREAK;
    t[b',' as usize] = C_COMMA;
    t
};

/// `NEXT_STATE[state][class]` of the digit-operator-digit scanner (spaces keep the state).
const NEXT_STATE: [[u8; 7]; 3] = [
    // other, symbol, digit, op, space, break, comma
    [0, 0, 1, 0, 0, 0, 0],
    [0, 0, 1, 2, 1, 0, 0],
    [0, 0, 1, 0, 2, 0, 0],
];

/// The default threshold: with the default weights, the score at which a quarter of the
/// calibration prompts go strong (see the module docs).
pub const DEFAULT_THRESHOLD: f64 = 0.48;

/// Most contract holders whose share is tracked at once.
pub const MAX_HOLDERS: usize = 65_536;
/// A holder's counters halve when its decisions reach this.
const SHARE_HALVE_AT: u64 = 1 << 16;

/// Weights of the score's terms (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    pub prompt_tokens: f64,
    pub words: f64,
    pub commas: f64,
    pub depth: f64,
    pub tools: f64,
    pub code: f64,
    pub math: f64,
    pub keywords: f64,
}

impl Default for Weights {
    /// Fitted on RouteLLM's GSM8K and MMLU outcomes (words, commas, prompt_tokens, math) or
    /// kept as priors where that data has nothing to say (depth, tools, code, keywords); see
    /// the module docs.
    fn default() -> Self {
        Weights {
            prompt_tokens: 0.0,
            words: 0.8,
            commas: 0.2,
            depth: 0.15,
            tools: 0.15,
            code: 0.4,
            math: 0.0,
            keywords: 0.5,
        }
    }
}

impl Weights {
    pub const NAMES: [&'static str; 8] = [
        "prompt_tokens",
        "words",
        "commas",
        "depth",
        "tools",
        "code",
        "math",
        "keywords",
    ];

    /// The weights in the order of [`Weights::NAMES`].
    pub fn values(&self) -> [f64; 8] {
        [
            self.prompt_tokens,
            self.words,
            self.commas,
            self.depth,
            self.tools,
            self.code,
            self.math,
            self.keywords,
        ]
    }

    /// Sets one weight by name (from configuration).
    pub fn set(&mut self, name: &str, value: f64) -> Result<()> {
        if !(value.is_finite() && value >= 0.0) {
            return Err(RouterError::Invalid(format!(
                "tier weight {name:?} must be a finite number >= 0, got {value}"
            )));
        }
        let slot = match name {
            "prompt_tokens" => &mut self.prompt_tokens,
            "words" => &mut self.words,
            "commas" => &mut self.commas,
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
    /// Runs of bytes other than space, tab, CR and LF.
    pub words: u32,
    pub commas: u32,
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
        // Words, commas, symbols, and every digit [spaces] op [spaces] digit (counted once per
        // operator). Most bytes are "other", a well-predicted branch; a branch-free table walk
        // measured slower (its state is a serial chain of loads).
        let mut state = 0u8; // 0: nothing, 1: after a digit, 2: after digit + operator
        let mut blank = false; // the previous byte is a space, tab, CR or LF
        let mut gaps = 0u32; // runs of such bytes
        for &b in text.as_bytes() {
            let class = BYTE_CLASS[b as usize];
            if class == C_OTHER {
                blank = false;
                state = 0;
                continue;
            }
            let is_blank = class == C_SPACE || class == C_BREAK;
            gaps += u32::from(is_blank & !blank);
            blank = is_blank;
            f.symbols += u32::from(class == C_SYMBOL);
            f.commas += u32::from(class == C_COMMA);
            f.math_markers += u32::from(state == 2 && class == C_DIGIT);
            state = NEXT_STATE[state as usize][class as usize];
        }
        // Words are the runs between the gaps: one more than the gaps, less one for a gap at
        // either end (counting gaps in the rare branch keeps the common one short).
        let bytes = text.as_bytes();
        let is_blank =
            |b: Option<&u8>| b.is_some_and(|&b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        if !bytes.is_empty() {
            f.words =
                gaps + 1 - u32::from(is_blank(bytes.first())) - u32::from(is_blank(bytes.last()));
        }
        f
    }

    /// The complexity score in [0, 1].
    pub fn score(&self, f: &Features) -> f64 {
        let w = &self.weights;
        let length = ((1.0 + f.prompt_tokens as f64).ln() / (1.0 + 8192f64).ln()).min(1.0);
        let words = ((1.0 + f.words as f64).ln() / (1.0 + 4096f64).ln()).min(1.0);
        let commas = (f.commas as f64 / 10.0).min(1.0);
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
            + w.words * words
            + w.commas * commas
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
