//! Server-sent-event relay: what the gateway needs to know about an upstream's token stream,
//! found in one pass over each upstream read. This is the only place an upstream stream is
//! parsed: [`SseScanner`] reads OpenAI's wire, [`AnthropicScanner`] (in `anthropic`) the
//! Anthropic Messages wire; both cut events with one [`Splitter`].
//!
//! An OpenAI-compatible stream is a sequence of events separated by a blank line (`\n\n`, or
//! `\r\n\r\n`), each with `data: {json chunk}` lines and a final `data: [DONE]`. For each read
//! the gateway hands over, [`SseScanner::feed`] returns the bytes to forward to the client
//! (whole events only; an incomplete event waits for the next read) and notes:
//!
//! - `done`: the `[DONE]` event has been seen;
//! - `first_token`: a chunk carrying generated text has been seen (time to first token);
//! - `usage`: the data payload of the last chunk with a `usage` object (the gateway decodes it);
//! - `head`: the first chunk's `id`, `object`, `created` and `model`, for a usage chunk the
//!   gateway synthesizes;
//! - `errored`: a chunk with a top-level `error` object has been seen (OpenAI's mid-stream
//!   failure, forwarded; the stream will not end with `[DONE]`, and the gateway adds no error
//!   of its own after it);
//! - with a meter ([`SseScanner::with_meter`]): each choice's output tokens, counted as the
//!   events pass, so that a stream without usage (or with usage the gateway finds implausible)
//!   is metered without being kept, and money admission can extend its hold as output arrives.
//!
//! Output text is, per choice and in this order: the legacy completions `text`, then the delta's
//! `reasoning_content`, `content`, each `tool_calls[].function` `name` and `arguments`, and the
//! legacy `function_call` `name` and `arguments`. A choice's count equals the meter's count of
//! the concatenation of its texts, however the stream was split ([`StreamState`]).
//!
//! tokenhub asks every upstream for usage. When the client did not ask (`keep_usage =
//! false`), a usage-only chunk (`"choices": []`) is dropped from the output, and a chunk that
//! carries both choices and usage (LiteLLM's shape) is re-encoded without its `usage` field.
//! When the client did ask and the stream ends without usage, the `[DONE]` event is held back
//! (`held_done`): the gateway sends a usage chunk of its own (metered) and then `[DONE]`.
//!
//! Memory per stream is bounded, whatever the stream's length: the start of an event whose
//! separator has not arrived (at most `max_event` bytes, else [`RelayError::EventTooLarge`]),
//! the payloads not yet counted (at most [`BATCH_BYTES`] beyond one event), the last usage
//! payload, the head, and a stream counter per choice (at most [`MAX_CHOICES`]; text of further
//! choice indexes is counted together, so nothing goes unmetered).
//!
//! Performance notes: decoding a chunk costs ~0.4 µs (serde_json, ~260 bytes of OpenAI chunk,
//! strings borrowed unless escaped); feeding its delta to a stream counter ~0.09 µs; the
//! separator scan and the `"usage"` search ~0.01 µs (the `"error"` search, for `errored`, is
//! one more such scan; a chunk is decoded for it only when the key is there). Decoding every
//! event as it passes would add ~15 µs to a 32-token stream, about a tenth of what the gateway
//! spends on one, and for nothing when the upstream's usage is plausible. So payloads wait,
//! back to back, until [`BATCH_BYTES`] of them are held or a count is asked for, and are then
//! decoded and counted in order: a short stream whose count nobody asks for is never decoded
//! past its first token (as before the relay counted), a long one is counted in batches as it
//! passes. The Python version this replaced decoded each event again for money admission and
//! kept every payload until the end, ~150 bytes per output token per concurrent stream
//! (`benches/bench_stream_memory.py`).

pub mod anthropic;

pub use anthropic::AnthropicScanner;

use crate::meter::{Meter, StreamState};
use memchr::memmem::Finder;
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, LazyLock};

static LF2: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static CRLF2: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static ERROR_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));

/// Choice indexes counted apart (OpenAI's bound on `n`); text of further indexes is counted
/// together in one more counter.
pub const MAX_CHOICES: usize = 128;
/// Longest event (bytes up to its blank line) a relay holds back by default.
pub const DEFAULT_MAX_EVENT: usize = 4 << 20;
/// Payload bytes held for counting before they are decoded and counted.
pub const BATCH_BYTES: usize = 32 * 1024;
/// A head field whose JSON is longer than this is not kept.
const HEAD_VALUE_MAX: usize = 512;
const HEAD_KEYS: [&str; 4] = ["id", "object", "created", "model"];

/// What a relay refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// An event grew past `limit` bytes without its blank line: not a token stream.
    EventTooLarge { limit: usize },
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::EventTooLarge { limit } => write!(
                f,
                "an upstream stream event exceeds {limit} bytes without ending"
            ),
        }
    }
}

impl std::error::Error for RelayError {}

/// A JSON string, borrowed from the payload unless it has escapes.
#[derive(Default)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Deserialize, Default)]
struct Function<'a> {
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    arguments: Option<Text<'a>>,
}

#[derive(Deserialize, Default)]
struct ToolCall<'a> {
    #[serde(borrow)]
    function: Option<Function<'a>>,
}

#[derive(Deserialize, Default)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
    #[serde(borrow)]
    reasoning_content: Option<Text<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
    /// The legacy (pre-tools) function call.
    #[serde(borrow)]
    function_call: Option<Function<'a>>,
}

#[derive(Deserialize, Default)]
struct Choice<'a> {
    #[serde(default)]
    index: i64,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    message: Option<Delta<'a>>,
    /// Legacy completions.
    #[serde(borrow)]
    text: Option<Text<'a>>,
}

#[derive(Deserialize, Default)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<serde::de::IgnoredAny>,
}

fn text<'s>(s: &'s Option<Text<'_>>) -> &'s str {
    s.as_ref().map_or("", |t| &t.0)
}

impl Function<'_> {
    fn each_text<'s>(&'s self, f: &mut impl FnMut(&'s str)) {
        f(text(&self.name));
        f(text(&self.arguments));
    }
}

impl Delta<'_> {
    /// The delta's output texts, in the order they are counted (empty ones included).
    fn each_text<'s>(&'s self, f: &mut impl FnMut(&'s str)) {
        f(text(&self.reasoning_content));
        f(text(&self.content));
        for call in self.tool_calls.as_deref().unwrap_or_default() {
            if let Some(func) = &call.function {
                func.each_text(f);
            }
        }
        if let Some(func) = &self.function_call {
            func.each_text(f);
        }
    }

    fn has_text(&self) -> bool {
        let mut any = false;
        self.each_text(&mut |t| any |= !t.is_empty());
        any
    }
}

impl Choice<'_> {
    /// What is counted as this choice's output: `text`, then the delta's texts.
    fn each_text<'s>(&'s self, f: &mut impl FnMut(&'s str)) {
        f(text(&self.text));
        if let Some(d) = &self.delta {
            d.each_text(f);
        }
    }
}

impl<'a> Chunk<'a> {
    /// Lenient: a chunk that is not the expected JSON counts as one without text or usage,
    /// and is forwarded unchanged.
    fn parse(data: &'a [u8]) -> Chunk<'a> {
        serde_json::from_slice(data).unwrap_or_default()
    }

    fn choices(&self) -> &[Choice<'a>] {
        self.choices.as_deref().unwrap_or_default()
    }

    fn has_text(&self) -> bool {
        self.choices().iter().any(|c| {
            !text(&c.text).is_empty()
                || c.delta.as_ref().is_some_and(Delta::has_text)
                || c.message.as_ref().is_some_and(Delta::has_text)
        })
    }

    fn has_choices(&self) -> bool {
        !self.choices().is_empty()
    }
}

/// Where the next event ends: the index just past its blank-line separator.
fn event_end(
    buf: &[u8],
    from: usize,
    lf: &mut Option<usize>,
    crlf: &mut Option<usize>,
) -> Option<usize> {
    // Each separator kind is searched for at most once per position, never rescanning the
    // rest of the buffer for a kind that is absent.
    if lf.is_some_and(|p| p < from) {
        *lf = LF2.find(&buf[from..]).map(|p| p + from);
    }
    if crlf.is_some_and(|p| p < from) {
        *crlf = CRLF2.find(&buf[from..]).map(|p| p + from);
    }
    match (*lf, *crlf) {
        (Some(a), Some(b)) if b < a => Some(b + 4),
        (Some(a), _) => Some(a + 2),
        (None, Some(b)) => Some(b + 4),
        (None, None) => None,
    }
}

/// The event framing every scanner shares: an upstream read in, each whole event (its
/// blank-line separator included) handed over in order, the start of an unfinished event held
/// back for the next read (at most `max_event` bytes).
pub(crate) struct Splitter {
    pending: Vec<u8>,
    max_event: usize,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter::new(DEFAULT_MAX_EVENT)
    }
}

impl Splitter {
    pub(crate) fn new(max_event: usize) -> Self {
        Splitter {
            pending: Vec::new(),
            max_event,
        }
    }

    /// Bytes held back: the start of an event whose separator has not arrived yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Calls `each` with every whole event of the held-back rest and `data`, in order, and
    /// holds back what follows the last one. Refuses (and drops what it held) when the rest
    /// grows past `max_event` bytes without ending.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), RelayError> {
        if self.pending.is_empty() {
            let used = scan(data, &mut each);
            self.pending.extend_from_slice(&data[used..]);
        } else {
            // The held-back start of an event joins this read; a separator can straddle the
            // boundary, so the joined buffer is scanned from its start.
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(data);
            let used = scan(&buf, &mut each);
            // The rest in a buffer of its own size: between reads a stream holds the start of
            // one event, not the capacity of the last read.
            self.pending = if used == 0 { buf } else { buf[used..].to_vec() };
        }
        if self.pending.len() > self.max_event {
            self.pending = Vec::new();
            return Err(RelayError::EventTooLarge {
                limit: self.max_event,
            });
        }
        Ok(())
    }

    /// The upstream closed: the held-back rest as a last event with its separator added (None
    /// when nothing but whitespace is held).
    pub(crate) fn finish(&mut self) -> Option<Vec<u8>> {
        let mut ev = std::mem::take(&mut self.pending);
        if trim(&ev).is_empty() {
            return None;
        }
        ev.extend_from_slice(if ev.ends_with(b"\n") { b"\n" } else { b"\n\n" });
        Some(ev)
    }
}

/// Hands each whole event of `buf` to `each`; returns how many bytes they took.
fn scan(buf: &[u8], each: &mut impl FnMut(&[u8])) -> usize {
    let mut start = 0;
    let mut lf = LF2.find(buf);
    let mut crlf = CRLF2.find(buf);
    while let Some(end) = event_end(buf, start, &mut lf, &mut crlf) {
        each(&buf[start..end]);
        start = end;
    }
    start
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

/// `"usage"`, optional whitespace, `:`, optional whitespace, `{` (a `null` usage is no usage).
fn has_usage_object(data: &[u8]) -> bool {
    let mut at = 0;
    while let Some(p) = USAGE_KEY.find(&data[at..]) {
        let rest = data[at + p + 7..].trim_ascii_start();
        if let [b':', tail @ ..] = rest {
            if tail.trim_ascii_start().first() == Some(&b'{') {
                return true;
            }
        }
        at += p + 7;
    }
    false
}

/// A chunk whose top level has an `error` object (an escaped `\"error\"` inside a text never
/// reaches the decode: the caller looks for the unescaped key first).
fn is_error_chunk(data: &[u8]) -> bool {
    data.first() == Some(&b'{')
        && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data)
            .is_ok_and(|m| m.get("error").is_some_and(serde_json::Value::is_object))
}

/// One choice's running output count.
struct Counter {
    index: i64,
    state: StreamState,
    total: usize,
}

impl Counter {
    fn new(index: i64, meter: &Meter) -> Self {
        Counter {
            index,
            state: meter.stream(),
            total: 0,
        }
    }
}

/// One stream's scanner. See the module documentation.
pub struct SseScanner {
    keep_usage: bool,
    meter: Option<Arc<Meter>>,
    split: Splitter,
    done: bool,
    first_token: bool,
    held_done: bool,
    errored: bool,
    usage: Option<Vec<u8>>,
    head: Option<Vec<u8>>,
    /// Per choice index, in order of first appearance; at most MAX_CHOICES.
    counters: Vec<Counter>,
    /// Text of choice indexes beyond the first MAX_CHOICES.
    overflow: Option<Counter>,
    /// Payloads not counted yet, back to back, and where each one ends (at most BATCH_BYTES
    /// beyond one payload).
    batch: Vec<u8>,
    batch_ends: Vec<usize>,
    events: u64,
}

/// What to do with one event.
enum Verdict {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

/// A chunk's JSON without its top-level `usage` field (None: not an object, left as it is).
fn without_usage(data: &[u8]) -> Option<Vec<u8>> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(data).ok()?;
    v.remove("usage")?;
    serde_json::to_vec(&v).ok()
}

/// The head fields of a chunk that is a JSON object (None: it is not one).
fn head_of(data: &[u8]) -> Option<Vec<u8>> {
    if data.first() != Some(&b'{') {
        return None;
    }
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(data).ok()?;
    let mut head = serde_json::Map::new();
    for key in HEAD_KEYS {
        if let Some(value) = v.get(key) {
            if serde_json::to_vec(value).is_ok_and(|j| j.len() <= HEAD_VALUE_MAX) {
                head.insert(key.to_owned(), value.clone());
            }
        }
    }
    serde_json::to_vec(&head).ok()
}

impl SseScanner {
    /// A scanner that does not count output.
    pub fn new(keep_usage: bool) -> Self {
        Self::build(keep_usage, None, DEFAULT_MAX_EVENT)
    }

    /// A scanner that counts each choice's output with `meter` as events pass. An event
    /// longer than `max_event` bytes is refused.
    pub fn with_meter(keep_usage: bool, meter: Arc<Meter>, max_event: usize) -> Self {
        Self::build(keep_usage, Some(meter), max_event)
    }

    fn build(keep_usage: bool, meter: Option<Arc<Meter>>, max_event: usize) -> Self {
        SseScanner {
            keep_usage,
            meter,
            split: Splitter::new(max_event),
            done: false,
            first_token: false,
            held_done: false,
            errored: false,
            usage: None,
            head: None,
            counters: Vec::new(),
            overflow: None,
            batch: Vec::new(),
            batch_ends: Vec::new(),
            events: 0,
        }
    }

    pub fn done(&self) -> bool {
        self.done
    }

    pub fn first_token(&self) -> bool {
        self.first_token
    }

    /// A chunk with a top-level `error` object (a mid-stream failure) has been seen.
    pub fn errored(&self) -> bool {
        self.errored
    }

    /// The data payload of the last chunk that carried a usage object.
    pub fn usage(&self) -> Option<&[u8]> {
        self.usage.as_deref()
    }

    /// A JSON object with the first chunk's `id`, `object`, `created` and `model` (those it
    /// has); None until a chunk that is a JSON object has been seen.
    pub fn head(&self) -> Option<&[u8]> {
        self.head.as_deref()
    }

    /// Output tokens so far, all choices together (0 without a meter).
    pub fn output_tokens(&mut self) -> usize {
        self.count_batch();
        self.counters.iter().map(|c| c.total).sum::<usize>()
            + self.overflow.as_ref().map_or(0, |c| c.total)
    }

    /// (choice index, output tokens so far) for each choice counted apart, by index.
    pub fn choice_tokens(&mut self) -> Vec<(i64, usize)> {
        self.count_batch();
        let mut v: Vec<(i64, usize)> = self.counters.iter().map(|c| (c.index, c.total)).collect();
        v.sort_unstable();
        v
    }

    /// Whole events seen so far (forwarded or dropped).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The client asked for usage, none came, and the `[DONE]` event was held back for the
    /// gateway to send after a usage chunk of its own.
    pub fn held_done(&self) -> bool {
        self.held_done
    }

    /// Bytes held back: the start of an event whose separator has not arrived yet.
    pub fn pending(&self) -> usize {
        self.split.pending()
    }

    /// Takes one upstream read; returns the whole events to forward, in order. Refuses (and
    /// drops what it held) when an event grows past `max_event` bytes without ending.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, RelayError> {
        let mut out = Vec::with_capacity(data.len() + self.split.pending());
        // The splitter is lent out for the call, so that each event can update the scanner.
        let mut split = std::mem::take(&mut self.split);
        let r = split.feed(data, |ev| match self.inspect(ev) {
            Verdict::Keep => out.extend_from_slice(ev),
            Verdict::Drop => {}
            Verdict::Replace(new) => out.extend_from_slice(&new),
        });
        self.split = split;
        r.map(|()| out)
    }

    /// The upstream closed: whatever is held back is a last event without its blank line.
    /// Returns it with the separator added (empty if nothing is held or it is dropped).
    pub fn finish(&mut self) -> Vec<u8> {
        let Some(ev) = self.split.finish() else {
            return Vec::new();
        };
        match self.inspect(&ev) {
            Verdict::Keep => ev,
            Verdict::Drop => Vec::new(),
            Verdict::Replace(new) => new,
        }
    }

    /// Notes what one event says, and whether it is forwarded, dropped or re-encoded.
    fn inspect(&mut self, ev: &[u8]) -> Verdict {
        self.events += 1;
        let mut keep = true;
        // The event re-encoded so far, once a line of it had to change.
        let mut rewritten: Option<Vec<u8>> = None;
        let mut at = 0;
        while at < ev.len() {
            let end = memchr::memchr(b'\n', &ev[at..]).map_or(ev.len(), |p| at + p);
            let line_start = at;
            let line = &ev[at..end];
            at = end + 1;
            let mut replacement: Option<Vec<u8>> = None;
            if let Some(rest) = line.strip_prefix(b"data:") {
                let data = trim(rest);
                if data == b"[DONE]" {
                    self.done = true;
                    if self.keep_usage && self.usage.is_none() {
                        self.held_done = true;
                        keep = false;
                    }
                } else if !data.is_empty() {
                    match self.inspect_data(data) {
                        Verdict::Keep => {}
                        Verdict::Drop => keep = false,
                        Verdict::Replace(new) => replacement = Some(new),
                    }
                }
            }
            if let Some(new) = replacement {
                let out = rewritten.get_or_insert_with(|| ev[..line_start].to_vec());
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&new);
                if end < ev.len() {
                    if line.ends_with(b"\r") {
                        out.push(b'\r');
                    }
                    out.push(b'\n');
                }
            } else if let Some(out) = rewritten.as_mut() {
                out.extend_from_slice(&ev[line_start..at.min(ev.len())]);
            }
        }
        match (keep, rewritten) {
            (false, _) => Verdict::Drop,
            (true, Some(new)) => Verdict::Replace(new),
            (true, None) => Verdict::Keep,
        }
    }

    /// Notes what one data payload says. The client must not see usage it did not ask for:
    /// a usage-only chunk drops its event, usage beside choices is re-encoded away.
    fn inspect_data(&mut self, data: &[u8]) -> Verdict {
        if self.head.is_none() {
            self.head = head_of(data);
        }
        if !self.errored && ERROR_KEY.find(data).is_some() && is_error_chunk(data) {
            self.errored = true;
        }
        let usage = has_usage_object(data);
        if self.first_token && !usage {
            if self.meter.is_some() {
                self.batch.extend_from_slice(data);
                self.batch_ends.push(self.batch.len());
                if self.batch.len() >= BATCH_BYTES {
                    self.count_batch();
                }
            }
        } else {
            let chunk = Chunk::parse(data);
            if !self.first_token && chunk.has_text() {
                self.first_token = true;
            }
            if chunk.has_choices() {
                // In stream order: what waits is counted first. (A usage-only chunk leaves
                // the batch waiting: a count may never be asked for.)
                self.count_batch();
                self.count(&chunk);
            }
            if usage && chunk.usage.is_some() {
                self.usage = Some(data.to_vec());
                if self.keep_usage {
                    return Verdict::Keep;
                }
                if !chunk.has_choices() {
                    return Verdict::Drop;
                }
                return without_usage(data).map_or(Verdict::Keep, Verdict::Replace);
            }
        }
        Verdict::Keep
    }

    /// Decodes and counts the payloads that wait, in order.
    fn count_batch(&mut self) {
        if self.batch_ends.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let mut start = 0;
        for end in std::mem::take(&mut self.batch_ends) {
            self.count(&Chunk::parse(&batch[start..end]));
            start = end;
        }
        // Reused unless one long event made it large.
        if batch.capacity() <= 2 * BATCH_BYTES {
            self.batch = batch;
            self.batch.clear();
        }
    }

    /// Feeds each choice's texts to its counter (nothing without a meter).
    fn count(&mut self, chunk: &Chunk<'_>) {
        let Some(meter) = self.meter.as_deref() else {
            return;
        };
        for choice in chunk.choices() {
            let i = choice.index;
            let counter = match usize::try_from(i)
                .ok()
                .filter(|&k| self.counters.get(k).is_some_and(|c| c.index == i))
                .or_else(|| self.counters.iter().position(|c| c.index == i))
            {
                Some(k) => &mut self.counters[k],
                None if self.counters.len() < MAX_CHOICES => {
                    self.counters.push(Counter::new(i, meter));
                    let last = self.counters.len() - 1;
                    &mut self.counters[last]
                }
                None => self.overflow.get_or_insert_with(|| Counter::new(-1, meter)),
            };
            choice.each_text(&mut |t| {
                if !t.is_empty() {
                    counter.total = counter.state.feed(meter, t);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    trait FeedOk {
        fn feed_ok(&mut self, data: &[u8]) -> Vec<u8>;
    }

    impl FeedOk for SseScanner {
        fn feed_ok(&mut self, data: &[u8]) -> Vec<u8> {
            match self.feed(data) {
                Ok(out) => out,
                Err(e) => panic!("feed refused: {e}"),
            }
        }
    }

    const CL100K: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

    /// A small tiktoken vocabulary (every byte plus a few merges), so that counts depend on
    /// where texts join. Built once: the tests run in parallel.
    pub(super) fn toy_meter() -> Arc<Meter> {
        static TOY: std::sync::OnceLock<Arc<Meter>> = std::sync::OnceLock::new();
        Arc::clone(TOY.get_or_init(build_toy_meter))
    }

    fn build_toy_meter() -> Arc<Meter> {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for t in [
            "he", "ll", "llo", "hello", " w", " wor", " world", "  ", "'l", "'ll", "12", "123",
            "{\"", "\":", "ar", "arg",
        ] {
            tokens.push(t.as_bytes().to_vec());
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let body: String = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{} {i}\n", b64.encode(t)))
            .collect();
        let path = std::env::temp_dir().join(format!(
            "tokenhub-relay-toy-{}.tiktoken",
            std::process::id()
        ));
        if std::fs::write(&path, body).is_err() {
            panic!("cannot write the toy vocabulary");
        }
        match Meter::from_tiktoken_file(&path.to_string_lossy(), CL100K, &[], false) {
            Ok(m) => Arc::new(m),
            Err(e) => panic!("toy vocabulary: {e}"),
        }
    }

    /// xorshift64*: reproducible splits without a dependency.
    pub(super) struct Rng(pub(super) u64);

    impl Rng {
        pub(super) fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
        }
    }

    fn chunk(text: &str) -> String {
        format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{text:?}}}}}]}}\n\n")
    }

    const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn stream() -> String {
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        format!("{role}{}{}{USAGE}{DONE}", chunk("Hel"), chunk("lo"))
    }

    #[test]
    fn whole_read_keeps_or_drops_usage() {
        let s = stream();
        let mut keep = SseScanner::new(true);
        assert_eq!(keep.feed_ok(s.as_bytes()), s.as_bytes());
        assert!(keep.done() && keep.first_token());
        assert_eq!(keep.usage(), Some(trim(&USAGE.as_bytes()[5..])));
        assert_eq!(keep.events(), 5);

        let mut drop = SseScanner::new(false);
        assert_eq!(drop.feed_ok(s.as_bytes()), s.replace(USAGE, "").as_bytes());
        assert!(drop.usage().is_some());
    }

    #[test]
    fn every_split_gives_the_same_output() {
        for sep in ["\n\n", "\r\n\r\n"] {
            let s = stream().replace("\n\n", sep);
            let whole = SseScanner::new(false).feed_ok(s.as_bytes());
            for cut in 0..=s.len() {
                for cut2 in cut..=s.len().min(cut + 7) {
                    let mut sc = SseScanner::new(false);
                    let mut out = sc.feed_ok(&s.as_bytes()[..cut]);
                    out.extend(sc.feed_ok(&s.as_bytes()[cut..cut2]));
                    out.extend(sc.feed_ok(&s.as_bytes()[cut2..]));
                    out.extend(sc.finish());
                    assert_eq!(out, whole, "cut at {cut}/{cut2} with {sep:?}");
                    assert!(sc.done() && sc.first_token() && sc.usage().is_some());
                }
            }
        }
    }

    #[test]
    fn first_token_waits_for_text() {
        let mut sc = SseScanner::new(false);
        sc.feed_ok(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        );
        assert!(!sc.first_token());
        sc.feed_ok(b": keep-alive comment\n\n");
        assert!(!sc.first_token());
        sc.feed_ok(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{\"}}]}}]}\n\n");
        assert!(sc.first_token());
        let mut r = SseScanner::new(false);
        r.feed_ok(b"data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"Hmm\"}}]}\n\n");
        assert!(r.first_token());
        let mut legacy = SseScanner::new(false);
        legacy.feed_ok(b"data: {\"choices\":[{\"text\":\"x\",\"index\":0}]}\n\n");
        assert!(legacy.first_token());
        let mut call = SseScanner::new(false);
        call.feed_ok(b"data: {\"choices\":[{\"delta\":{\"function_call\":{\"name\":\"\"}}}]}\n\n");
        assert!(!call.first_token());
        call.feed_ok(
            b"data: {\"choices\":[{\"delta\":{\"function_call\":{\"arguments\":\"{\"}}}]}\n\n",
        );
        assert!(call.first_token());
    }

    #[test]
    fn garbage_is_forwarded() {
        let mut sc = SseScanner::new(false);
        let s = format!("{}data: not json\n\n{}{DONE}", chunk("a"), chunk("b"));
        assert_eq!(sc.feed_ok(s.as_bytes()), s.as_bytes());
        assert_eq!(sc.events(), 4);
        assert!(sc.usage().is_none() && sc.done());
    }

    #[test]
    fn usage_beside_choices_is_stripped_unless_asked_for_and_null_usage_is_not_usage() {
        // LiteLLM's shape: the last chunk carries both a finish reason and the usage.
        let both = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        for sep in ["\n\n", "\r\n\r\n"] {
            let ev = both.replace("\n\n", sep);
            let mut sc = SseScanner::new(false);
            let out = String::from_utf8(sc.feed_ok(ev.as_bytes())).unwrap();
            assert!(out.ends_with(sep) && out.starts_with("data: "), "{out:?}");
            let v: serde_json::Value = serde_json::from_str(out[6..].trim()).unwrap();
            assert_eq!(v["choices"][0]["delta"]["content"], "x");
            assert_eq!(v["id"], "c");
            assert!(v.get("usage").is_none(), "{out}");
            assert!(sc.usage().is_some());
            let mut keep = SseScanner::new(true);
            assert_eq!(keep.feed_ok(ev.as_bytes()), ev.as_bytes());
        }
        // Other lines of the event (an id, a comment) stay as they were.
        let framed = format!("id: 7\n{}", both);
        let out = SseScanner::new(false).feed_ok(framed.as_bytes());
        assert!(out.starts_with(b"id: 7\ndata: {") && out.ends_with(b"}\n\n"));
        assert!(memchr::memmem::find(&out, b"usage").is_none());
        let null = "data: {\"choices\":[],\"usage\":null}\n\n";
        let mut sc = SseScanner::new(false);
        assert_eq!(sc.feed_ok(null.as_bytes()), null.as_bytes());
        assert!(sc.usage().is_none());
        assert!(has_usage_object(b"{\"usage\" :\n {\"a\":1}}"));
        assert!(!has_usage_object(b"{\"content\":\"usage\"}"));
    }

    #[test]
    fn an_error_chunk_is_noted_and_forwarded_and_a_quoted_error_is_not_one() {
        let mut sc = SseScanner::with_meter(false, toy_meter(), DEFAULT_MAX_EVENT);
        let text = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"{\\\"error\\\": {}}\"}}]}\n\n";
        assert_eq!(sc.feed_ok(text.as_bytes()), text.as_bytes());
        assert!(sc.first_token() && !sc.errored());
        let not_object = "data: {\"error\":null,\"choices\":[]}\n\n";
        sc.feed_ok(not_object.as_bytes());
        assert!(!sc.errored());
        let err = "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n";
        assert_eq!(sc.feed_ok(err.as_bytes()), err.as_bytes());
        assert!(sc.errored() && !sc.done());
    }

    #[test]
    fn done_is_held_back_when_usage_was_asked_for_and_none_came() {
        let s = format!("{}{}{DONE}", chunk("a"), chunk("b"));
        let mut asked = SseScanner::new(true);
        assert_eq!(
            asked.feed_ok(s.as_bytes()),
            format!("{}{}", chunk("a"), chunk("b")).as_bytes()
        );
        assert!(asked.done() && asked.held_done() && asked.usage().is_none());
        // Unterminated at the close of the stream, too.
        let mut sc = SseScanner::new(true);
        sc.feed_ok(chunk("a").as_bytes());
        sc.feed_ok(b"data: [DONE]");
        assert!(sc.finish().is_empty() && sc.held_done());
        // With usage, or when the client did not ask, [DONE] goes through.
        let mut with = SseScanner::new(true);
        assert_eq!(with.feed_ok(stream().as_bytes()), stream().as_bytes());
        assert!(!with.held_done());
        let mut not_asked = SseScanner::new(false);
        assert_eq!(not_asked.feed_ok(s.as_bytes()), s.as_bytes());
        assert!(!not_asked.held_done());
    }

    #[test]
    fn finish_flushes_an_unterminated_last_event() {
        let mut sc = SseScanner::new(true);
        assert_eq!(sc.feed_ok(chunk("a").trim_end().as_bytes()), b"");
        assert_eq!(sc.pending(), chunk("a").trim_end().len());
        assert_eq!(sc.finish(), chunk("a").as_bytes());
        let mut sc = SseScanner::new(false);
        sc.feed_ok(b"data: [DONE]\n");
        assert_eq!(sc.finish(), b"data: [DONE]\n\n");
        assert!(sc.done());
        assert!(SseScanner::new(true).finish().is_empty());
    }

    /// A JSON string literal of `s` (the test streams' payload text).
    pub(super) fn json(s: &str) -> String {
        serde_json::to_string(s).unwrap_or_default()
    }

    /// Output fragments the random-stream tests mix: BPE merges split apart, escapes, JSON,
    /// whitespace runs and multi-byte text.
    pub(super) const MIXED_WORDS: [&str; 15] = [
        "hello",
        " world",
        "'ll",
        "  ",
        "12345",
        "\n\n",
        " wor",
        "he",
        "\"q\"",
        "é",
        "中文",
        "{\"arg\": 1}",
        " ",
        "llo",
        "\t",
    ];

    /// A stream of `n` interleaved choices mixing every kind of output text, with the texts
    /// each choice should be counted on.
    fn mixed_stream(rng: &mut Rng, n: usize, steps: usize) -> (String, Vec<String>) {
        let words = MIXED_WORDS;
        let mut out = String::new();
        let mut texts = vec![String::new(); n];
        let role = format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{}]}}\n\n",
            (0..n)
                .map(|i| format!("{{\"index\":{i},\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}}}}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        out.push_str(&role);
        for _ in 0..steps {
            let i = rng.below(n);
            let w = |rng: &mut Rng| words[rng.below(words.len())].to_owned();
            let (a, b) = (w(rng), w(rng));
            let delta = match rng.below(6) {
                0 => {
                    texts[i].push_str(&a);
                    format!("\"delta\":{{\"content\":{}}}", json(&a))
                }
                1 => {
                    // Reasoning is counted before content within one delta.
                    texts[i].push_str(&b);
                    texts[i].push_str(&a);
                    format!(
                        "\"delta\":{{\"content\":{},\"reasoning_content\":{}}}",
                        json(&a),
                        json(&b)
                    )
                }
                2 => {
                    texts[i].push_str(&a);
                    texts[i].push_str(&b);
                    format!(
                        "\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"name\":{},\"arguments\":{}}}}}]}}",
                        json(&a),
                        json(&b)
                    )
                }
                3 => {
                    texts[i].push_str(&a);
                    format!(
                        "\"delta\":{{\"function_call\":{{\"arguments\":{}}}}}",
                        json(&a)
                    )
                }
                4 => {
                    texts[i].push_str(&a);
                    format!("\"text\":{}", json(&a))
                }
                _ => "\"delta\":{\"content\":null},\"finish_reason\":null".to_owned(),
            };
            // Now and then usage beside the choice (LiteLLM's shape), mid-stream: decoded at
            // once, after what waits to be counted.
            let usage = if rng.below(12) == 0 {
                ",\"usage\":{\"prompt_tokens\":1}"
            } else {
                ""
            };
            out.push_str(&format!(
                "data: {{\"id\":\"c1\",\"choices\":[{{\"index\":{i},{delta}}}]{usage}}}\n\n"
            ));
            if rng.below(10) == 0 {
                out.push_str(": keep-alive\n\n");
            }
        }
        (out, texts)
    }

    #[test]
    fn counts_each_choice_like_the_meter_counts_its_joined_text_for_any_split() {
        let meter = toy_meter();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..60 {
            let n = 1 + rng.below(4);
            let steps = 5 + rng.below(60);
            let (s, texts) = mixed_stream(&mut rng, n, steps);
            let s = if round % 3 == 0 {
                s.replace("\n\n", "\r\n\r\n")
            } else {
                s
            };
            let whole = format!("{s}{USAGE}{DONE}");
            let bytes = whole.as_bytes();
            let mut sc = SseScanner::with_meter(true, Arc::clone(&meter), DEFAULT_MAX_EVENT);
            let mut at = 0;
            let mut out = Vec::new();
            while at < bytes.len() {
                let most = if rng.below(2) == 0 { 8 } else { 300 };
                let step = 1 + rng.below(most);
                let end = (at + step).min(bytes.len());
                out.extend(sc.feed_ok(&bytes[at..end]));
                at = end;
            }
            out.extend(sc.finish());
            assert_eq!(out, whole.as_bytes(), "round {round}");
            let want: Vec<(i64, usize)> = (0..n as i64)
                .zip(texts.iter().map(|t| meter.count(t)))
                .collect();
            assert_eq!(sc.choice_tokens(), want, "round {round}: {texts:?}");
            assert_eq!(
                sc.output_tokens(),
                texts.iter().map(|t| meter.count(t)).sum::<usize>()
            );
            assert!(sc.done() && sc.usage().is_some());
            assert_eq!(
                sc.head(),
                Some(&b"{\"created\":7,\"id\":\"c1\",\"model\":\"m\",\"object\":\"chat.completion.chunk\"}"[..])
            );
        }
    }

    #[test]
    fn payloads_wait_for_a_count_within_the_batch_bound() {
        let meter = toy_meter();
        let mut sc = SseScanner::with_meter(false, Arc::clone(&meter), DEFAULT_MAX_EVENT);
        let ev = chunk("hello");
        sc.feed_ok(ev.as_bytes());
        // After the first token, payloads wait until a count is asked for...
        sc.feed_ok(ev.repeat(10).as_bytes());
        assert_eq!(sc.batch_ends.len(), 10);
        assert_eq!(sc.output_tokens(), 11);
        assert!(sc.batch.is_empty() && sc.batch_ends.is_empty());
        // ...or until BATCH_BYTES of them are held: a long stream holds no more than that.
        for _ in 0..2000 {
            sc.feed_ok(ev.as_bytes());
            assert!(sc.batch.len() < BATCH_BYTES);
            assert!(sc.batch.capacity() <= 2 * BATCH_BYTES);
        }
        assert_eq!(sc.output_tokens(), 2011);
        // A usage-only chunk leaves the batch waiting; usage beside a choice is counted at
        // once, after what waits.
        sc.feed_ok(ev.as_bytes());
        sc.feed_ok(USAGE.as_bytes());
        assert!(sc.usage().is_some() && sc.batch_ends.len() == 1);
        let both = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        sc.feed_ok(both.as_bytes());
        assert!(sc.batch.is_empty());
        assert_eq!(sc.output_tokens(), 2013);
    }

    #[test]
    fn choices_beyond_the_bound_are_counted_together() {
        let meter = toy_meter();
        let mut sc = SseScanner::with_meter(true, Arc::clone(&meter), DEFAULT_MAX_EVENT);
        let mut s = String::new();
        for i in 0..(MAX_CHOICES + 10) {
            s.push_str(&format!(
                "data: {{\"choices\":[{{\"index\":{i},\"delta\":{{\"content\":\"hello\"}}}}]}}\n\n"
            ));
        }
        sc.feed_ok(s.as_bytes());
        assert_eq!(sc.choice_tokens().len(), MAX_CHOICES);
        // The ten further choices share one counter: "hello" x 10 joined.
        assert_eq!(
            sc.output_tokens(),
            MAX_CHOICES + meter.count(&"hello".repeat(10))
        );
    }

    #[test]
    fn an_event_past_the_bound_is_refused_and_nothing_is_kept() {
        let meter = toy_meter();
        let mut sc = SseScanner::with_meter(false, Arc::clone(&meter), 64);
        assert!(sc.feed(chunk("a").as_bytes()).is_ok());
        assert!(sc
            .feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"")
            .is_ok());
        let err = sc.feed(&[b'x'; 64]);
        assert_eq!(err, Err(RelayError::EventTooLarge { limit: 64 }));
        assert_eq!(sc.pending(), 0);
        // Whole events of any length within one read are fine; only a held rest is bounded.
        let mut sc = SseScanner::with_meter(false, meter, 64);
        let long = chunk(&"x".repeat(500));
        assert_eq!(sc.feed_ok(long.as_bytes()), long.as_bytes());
        assert_eq!(sc.output_tokens(), 500);
    }

    #[test]
    fn head_is_the_first_json_object_and_keeps_small_fields_only() {
        let mut sc = SseScanner::new(true);
        sc.feed_ok(b"data: not json\n\ndata: [1,2]\n\n");
        assert_eq!(sc.head(), None);
        let big = "m".repeat(HEAD_VALUE_MAX + 1);
        sc.feed_ok(
            format!("data: {{\"id\":\"x\",\"model\":\"{big}\",\"created\":null}}\n\n").as_bytes(),
        );
        sc.feed_ok(b"data: {\"id\":\"later\",\"model\":\"m\"}\n\n");
        assert_eq!(sc.head(), Some(&b"{\"created\":null,\"id\":\"x\"}"[..]));
    }

    #[test]
    fn without_a_meter_nothing_is_counted() {
        let mut sc = SseScanner::new(false);
        sc.feed_ok(stream().as_bytes());
        assert_eq!(sc.output_tokens(), 0);
        assert!(sc.choice_tokens().is_empty());
    }
}
