//! Pre-tokenization: cutting text into the pieces that BPE then merges within.
//!
//! The general engine runs the vocabulary's own regular expressions with `fancy-regex` (the
//! engine tiktoken uses; its semantics match Oniguruma's for these patterns). Known pattern
//! families are recognised by their exact pattern text and served by the hand-written
//! scanners of [`crate::meter::scan`] instead, which cut exactly the same pieces (tested
//! against the regex engine) 13-35 times faster.

use crate::meter::error::{MeterError, Result};
use crate::meter::scan::Scanner;
use fancy_regex::Regex;

pub use crate::meter::scan::GPT2_PATTERN;

/// One pre-tokenization stage.
pub enum Stage {
    /// tiktoken semantics: the pieces are the regex matches; text that no match covers is
    /// dropped, as tiktoken's `find_iter` loop drops it.
    Findall(Regex),
    /// HF `Split` with `behavior: Isolated, invert: false`: matches and the gaps between them
    /// are pieces, and each piece goes on to the next stage on its own (so a lookahead at the
    /// end of a piece sees the end of the piece, not the rest of the text).
    Isolated(Regex),
}

impl Stage {
    pub fn findall(pattern: &str) -> Result<Self> {
        Ok(Stage::Findall(compile(pattern)?))
    }

    pub fn isolated(pattern: &str) -> Result<Self> {
        Ok(Stage::Isolated(compile(pattern)?))
    }
}

fn compile(pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| MeterError::Pattern {
        pattern: pattern.to_owned(),
        message: e.to_string(),
    })
}

pub struct Pretokenizer {
    stages: Vec<Stage>,
    /// Cuts what `stages` cut, when they are a known family.
    scanner: Option<Scanner>,
}

impl Pretokenizer {
    pub fn new(stages: Vec<Stage>) -> Self {
        let scanner = Self::known_scanner(&stages);
        Pretokenizer { stages, scanner }
    }

    fn known_scanner(stages: &[Stage]) -> Option<Scanner> {
        match stages {
            [Stage::Findall(re)] => Scanner::for_findall(re.as_str()),
            _ => {
                let patterns = stages
                    .iter()
                    .map(|s| match s {
                        Stage::Isolated(re) => Some(re.as_str()),
                        Stage::Findall(_) => None,
                    })
                    .collect::<Option<Vec<&str>>>()?;
                Scanner::for_isolated(&patterns)
            }
        }
    }

    /// The hand-written scanner serving this pre-tokenizer, if any.
    pub fn scanner(&self) -> Option<&Scanner> {
        self.scanner.as_ref()
    }

    /// A single tiktoken-style pattern.
    pub fn tiktoken(pattern: &str) -> Result<Self> {
        Ok(Self::new(vec![Stage::findall(pattern)?]))
    }

    /// Calls `f` with each piece of `text`, in order.
    #[inline]
    pub fn for_each<'t, F: FnMut(&'t str)>(&self, text: &'t str, f: &mut F) {
        match &self.scanner {
            Some(s) => s.for_each(text, f),
            None => self.run(0, text, f),
        }
    }

    /// As [`Pretokenizer::for_each`], always with the regex engine (the reference the
    /// scanners are tested and measured against).
    pub fn for_each_regex<'t, F: FnMut(&'t str)>(&self, text: &'t str, f: &mut F) {
        self.run(0, text, f);
    }

    fn run<'t, F: FnMut(&'t str)>(&self, level: usize, text: &'t str, f: &mut F) {
        if text.is_empty() {
            return;
        }
        let Some(stage) = self.stages.get(level) else {
            f(text);
            return;
        };
        match stage {
            Stage::Findall(re) => {
                let mut at = 0;
                for m in re.find_iter(text) {
                    match m {
                        Ok(m) => {
                            self.run(level + 1, m.as_str(), f);
                            at = m.end();
                        }
                        Err(_) => {
                            // The backtracking limit was hit: keep the rest as one piece rather
                            // than lose its tokens.
                            self.run(level + 1, &text[at..], f);
                            return;
                        }
                    }
                }
            }
            Stage::Isolated(re) => {
                let mut at = 0;
                for m in re.find_iter(text) {
                    match m {
                        Ok(m) => {
                            if m.start() > at {
                                self.run(level + 1, &text[at..m.start()], f);
                            }
                            if m.end() > m.start() {
                                self.run(level + 1, m.as_str(), f);
                            }
                            at = m.end();
                        }
                        Err(_) => break,
                    }
                }
                if at < text.len() {
                    self.run(level + 1, &text[at..], f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CL100K: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

    fn pieces(p: &Pretokenizer, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        p.for_each(text, &mut |s: &str| out.push(s.to_owned()));
        out
    }

    #[test]
    fn findall_cuts_like_tiktoken() {
        let Ok(p) = Pretokenizer::tiktoken(CL100K) else {
            panic!("pattern compiles")
        };
        assert_eq!(
            pieces(&p, "Hello world's  12345"),
            ["Hello", " world", "'s", " ", " ", "123", "45"]
        );
    }

    #[test]
    fn isolated_stages_keep_gaps_and_nest() {
        let (Ok(a), Ok(b)) = (
            Stage::isolated(r"\p{N}{1,3}"),
            Stage::isolated(r"\s+(?!\S)|\s+"),
        ) else {
            panic!("patterns compile")
        };
        let p = Pretokenizer::new(vec![a, b]);
        assert_eq!(pieces(&p, "ab  1234 c"), ["ab", "  ", "123", "4", " ", "c"]);
    }
}
