//! Vocabulary loaders: tiktoken rank files and HuggingFace `tokenizer.json`.
//!
//! A `tokenizer.json` that tokenhub's own BPE path can reproduce exactly (byte-level BPE with
//! regex `Split` pre-tokenizers, no normalizer or NFC, plain added tokens) is served by it; any
//! other model or configuration is served by the `tokenizers` crate itself.

use crate::meter::bpe::{Bpe, BpeSpec, BuildError};
use crate::meter::error::{MeterError, Result};
use crate::meter::pretok::{Pretokenizer, Stage, GPT2_PATTERN};
use base64::Engine;
use serde_json::Value;

fn corrupt(path: &str, line: Option<usize>, message: impl Into<String>) -> MeterError {
    MeterError::Corrupt {
        path: path.to_owned(),
        line,
        message: message.into(),
    }
}

pub fn read_file(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| MeterError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Parses a tiktoken rank file: one `base64(token) rank` pair per line.
pub fn parse_tiktoken(path: &str, data: &[u8]) -> Result<Vec<(Vec<u8>, u32)>> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut vocab = Vec::with_capacity(data.len() / 12);
    for (index, line) in data.split(|&b| b == b'\n').enumerate() {
        let lineno = index + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
        let (Some(token), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(corrupt(
                path,
                Some(lineno),
                "expected `<base64 token> <rank>`",
            ));
        };
        let token = engine.decode(token).map_err(|e| {
            corrupt(
                path,
                Some(lineno),
                format!("token is not valid base64: {e}"),
            )
        })?;
        let rank = std::str::from_utf8(rank)
            .ok()
            .and_then(|r| r.parse::<u32>().ok())
            .ok_or_else(|| corrupt(path, Some(lineno), "rank is not a non-negative integer"))?;
        vocab.push((token, rank));
    }
    if vocab.is_empty() {
        return Err(corrupt(path, None, "the file holds no tokens"));
    }
    Ok(vocab)
}

pub fn bpe_error(path: &str, e: BuildError) -> MeterError {
    match e {
        BuildError::MissingByte(b) => corrupt(
            path,
            None,
            format!("the vocabulary has no token for the single byte 0x{b:02x}"),
        ),
        BuildError::MergeUnknown { message, .. } => corrupt(path, None, message),
    }
}

/// GPT-2's reversible byte <-> printable character table, as HF's ByteLevel uses it.
fn byte_level_decoder() -> rustc_hash::FxHashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .iter()
        .zip(chars.iter())
        .filter_map(|(&b, &c)| char::from_u32(c).map(|c| (c, b as u8)))
        .collect()
}

/// What a `tokenizer.json` reduces to on the fast path.
pub struct JsonVocab {
    pub pretokenizer: Pretokenizer,
    pub bpe: Bpe,
    pub nfc: bool,
    /// Non-special added tokens: matched in text (as HF does) before pre-tokenization.
    pub added: Vec<(String, u32)>,
    /// Special added tokens: never matched in text, only decoded.
    pub special: Vec<(String, u32)>,
}

pub enum JsonLoad {
    Fast(Box<JsonVocab>),
    /// The configuration needs the `tokenizers` crate; the reason is kept for `describe()`.
    Fallback(String),
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn is_falsy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => !b,
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

pub fn parse_tokenizer_json(path: &str, data: &[u8]) -> Result<(Value, JsonLoad)> {
    let root: Value = serde_json::from_slice(data).map_err(|e| {
        corrupt(
            path,
            Some(e.line()),
            format!("invalid JSON at column {}: {e}", e.column()),
        )
    })?;
    let model = root
        .get("model")
        .filter(|m| m.is_object())
        .ok_or_else(|| corrupt(path, None, "no \"model\" object"))?;
    let load = fast_path(path, &root, model)?;
    Ok((root, load))
}

fn fast_path(path: &str, root: &Value, model: &Value) -> Result<JsonLoad> {
    let fallback = |why: &str| Ok(JsonLoad::Fallback(why.to_owned()));
    if str_field(model, "type").unwrap_or("BPE") != "BPE" {
        return fallback("model type is not BPE");
    }
    for key in [
        "dropout",
        "continuing_subword_prefix",
        "end_of_word_suffix",
        "byte_fallback",
    ] {
        if !is_falsy(model.get(key)) {
            return fallback(&format!("BPE option {key} is set"));
        }
    }
    let ignore_merges = model
        .get("ignore_merges")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let nfc = match root.get("normalizer") {
        None | Some(Value::Null) => false,
        Some(n) => match normalizer_list(n) {
            Some(list) if list.is_empty() => false,
            Some(list) if list == ["NFC"] => true,
            _ => return fallback("normalizer is not empty or NFC"),
        },
    };

    let Some(stages) = pretokenizer_stages(root.get("pre_tokenizer"))? else {
        return fallback("pre-tokenizer is not byte-level with regex splits");
    };

    // Added tokens also appear in the vocab map, spelled as themselves rather than byte-level.
    let added_ids: rustc_hash::FxHashSet<u64> = root
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|t| t.get("id").and_then(Value::as_u64))
                .collect()
        })
        .unwrap_or_default();
    let decode = byte_level_decoder();
    let vocab_obj = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| corrupt(path, None, "model has no \"vocab\" object"))?;
    let mut vocab = Vec::with_capacity(vocab_obj.len());
    for (token, id) in vocab_obj {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| {
                corrupt(
                    path,
                    None,
                    format!("vocab id of {token:?} is not an integer"),
                )
            })?;
        let Some(bytes) = token
            .chars()
            .map(|c| decode.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
        else {
            if added_ids.contains(&(id as u64)) {
                continue;
            }
            return fallback("vocabulary is not byte-level");
        };
        vocab.push((bytes, id));
    }

    let merges_val = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| corrupt(path, None, "model has no \"merges\" list"))?;
    let mut merges = Vec::with_capacity(merges_val.len());
    for (i, m) in merges_val.iter().enumerate() {
        let (left, right) = match m {
            Value::String(s) => match s.split_once(' ') {
                Some((a, b)) => (a.to_owned(), b.to_owned()),
                None => return Err(corrupt(path, None, format!("merge {i} is not \"a b\""))),
            },
            Value::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str()) {
                (Some(a), Some(b)) => (a.to_owned(), b.to_owned()),
                _ => return Err(corrupt(path, None, format!("merge {i} is not two strings"))),
            },
            _ => return Err(corrupt(path, None, format!("merge {i} is malformed"))),
        };
        let to_bytes = |s: &str| {
            s.chars()
                .map(|c| decode.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
        };
        match (to_bytes(&left), to_bytes(&right)) {
            (Some(a), Some(b)) => merges.push((a, b)),
            _ => return fallback("merges are not byte-level"),
        }
    }

    let mut added = Vec::new();
    let mut special = Vec::new();
    for tok in root
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let (Some(content), Some(id)) = (
            str_field(tok, "content"),
            tok.get("id")
                .and_then(Value::as_u64)
                .and_then(|i| u32::try_from(i).ok()),
        ) else {
            return Err(corrupt(
                path,
                None,
                "an added token lacks \"content\" or \"id\"",
            ));
        };
        if tok.get("special").and_then(Value::as_bool).unwrap_or(false) {
            special.push((content.to_owned(), id));
        } else {
            for key in ["single_word", "lstrip", "rstrip"] {
                if !is_falsy(tok.get(key)) {
                    return fallback(&format!("added token option {key} is set"));
                }
            }
            if nfc {
                return fallback("added tokens with a normalizer");
            }
            added.push((content.to_owned(), id));
        }
    }

    let bpe = Bpe::new(BpeSpec {
        vocab,
        merges: Some(merges),
        ignore_merges,
    })
    .map_err(|e| bpe_error(path, e))?;
    Ok(JsonLoad::Fast(Box::new(JsonVocab {
        pretokenizer: Pretokenizer::new(stages),
        bpe,
        nfc,
        added,
        special,
    })))
}

/// The normalizer as a flat list of type names, or None when it has options we do not model.
fn normalizer_list(n: &Value) -> Option<Vec<String>> {
    match str_field(n, "type")? {
        "Sequence" => {
            let mut out = Vec::new();
            for inner in n.get("normalizers")?.as_array()? {
                out.extend(normalizer_list(inner)?);
            }
            Some(out)
        }
        "NFC" => Some(vec!["NFC".to_owned()]),
        _ => None,
    }
}

/// Regex stages for a byte-level pre-tokenizer, or None for any other kind.
fn pretokenizer_stages(p: Option<&Value>) -> Result<Option<Vec<Stage>>> {
    let Some(p) = p.filter(|p| !p.is_null()) else {
        return Ok(None);
    };
    let list: Vec<&Value> = match str_field(p, "type") {
        Some("Sequence") => match p.get("pretokenizers").and_then(Value::as_array) {
            Some(l) => l.iter().collect(),
            None => return Ok(None),
        },
        _ => vec![p],
    };
    let Some((last, splits)) = list.split_last() else {
        return Ok(None);
    };
    if str_field(last, "type") != Some("ByteLevel") || !is_falsy(last.get("add_prefix_space")) {
        return Ok(None);
    }
    let mut stages = Vec::new();
    for s in splits {
        if str_field(s, "type") != Some("Split")
            || str_field(s, "behavior") != Some("Isolated")
            || !is_falsy(s.get("invert"))
        {
            return Ok(None);
        }
        let pattern = s.get("pattern");
        if let Some(re) = pattern.and_then(|p| str_field(p, "Regex")) {
            stages.push(Stage::isolated(re)?);
        } else if let Some(lit) = pattern.and_then(|p| str_field(p, "String")) {
            stages.push(Stage::isolated(&fancy_regex::escape(lit))?);
        } else {
            return Ok(None);
        }
    }
    if last
        .get("use_regex")
        .and_then(Value::as_bool)
        .unwrap_or(true)
    {
        stages.push(Stage::isolated(GPT2_PATTERN)?);
    }
    Ok(Some(stages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiktoken_errors_name_the_line() {
        let err = parse_tiktoken("v.tiktoken", b"IQ== 0\nIg== 1\nnot-a-line\n");
        match err {
            Err(MeterError::Corrupt { line: Some(3), .. }) => {}
            _ => panic!("expected a corrupt-line error on line 3"),
        }
        assert!(matches!(
            parse_tiktoken("v", b"IQ== x\n"),
            Err(MeterError::Corrupt { line: Some(1), .. })
        ));
        assert!(matches!(
            parse_tiktoken("v", b"@@@ 1\n"),
            Err(MeterError::Corrupt { line: Some(1), .. })
        ));
    }

    #[test]
    fn byte_level_table_is_a_bijection() {
        let t = byte_level_decoder();
        assert_eq!(t.len(), 256);
        assert_eq!(t.get(&'Ġ'), Some(&b' '));
        assert_eq!(t.get(&'!'), Some(&b'!'));
    }
}
