//! What a running ecst is doing, as one model built from its own `/metrics` text, and two
//! renderings of it: lines for `ecst top`, one HTML page for `GET /`.
//!
//! Design: both views read the Prometheus exposition the process already serves, never internal
//! state, so they cannot show a fact that Prometheus would not see (and a scrape of an older or
//! newer ecst degrades to "—" for what it lacks, not to an error). Rates need two samples; the
//! caller keeps the previous one ([`Rates`]) and a counter that went down (a restart) yields no
//! rate rather than a negative one. Readiness reasons, which are not metrics, come from `/ready`
//! and are shown as given.
//!
//! What each figure means:
//! * per table: events committed to Kafka (`ecst_source_events_total`) and their rate; snapshot
//!   rows read against the estimate, the rate and the ETA while that table is read;
//! * source: the committed binlog position against the server's end, the bytes between them,
//!   how many files a purge removes before it reaches ours, and the earliest it can (the
//!   retention poller's lower bound); lag behind MySQL's commit time; the age of the last event
//!   heard (heartbeats included);
//! * per mapping: changes applied and skipped as stale, and their rates; consumer lag and dead
//!   letters of the topic it reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::metrics as m;

/// A series' labels, in the order served.
type Labels = Vec<(String, String)>;

/// One scrape: every series by metric name.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    series: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Sample {
    /// Parses the Prometheus text exposition format (comments and malformed lines skipped).
    pub fn parse(text: &str) -> Sample {
        let mut s = Sample::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((name, labels, value)) = parse_line(line) {
                s.series.entry(name).or_default().push((labels, value));
            }
        }
        s
    }

    /// Whether any series of a name starting with `prefix` exists.
    fn has_prefix(&self, prefix: &str) -> bool {
        self.series.keys().any(|k| k.starts_with(prefix))
    }

    /// The value of an unlabelled (or first) series.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.series.get(name)?.first().map(|(_, v)| *v)
    }

    /// The series of `name` whose label `key` is `want`.
    fn with_label(&self, name: &str, key: &str, want: &str) -> Option<f64> {
        self.series
            .get(name)?
            .iter()
            .find(|(l, _)| label(l, key) == Some(want))
            .map(|(_, v)| *v)
    }

    /// Values of `name` summed by the value of label `key`.
    fn by_label(&self, name: &str, key: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.series.get(name).into_iter().flatten() {
            if let Some(l) = label(labels, key) {
                *out.entry(l.to_string()).or_insert(0.0) += v;
            }
        }
        out
    }

    /// `(mapping, topic)` pairs of the mapping info series.
    fn mapping_topics(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (labels, _) in self.series.get(m::SINK_MAPPING_INFO).into_iter().flatten() {
            if let (Some(mp), Some(t)) = (
                label(labels, m::MAPPING_LABEL),
                label(labels, m::TOPIC_LABEL),
            ) {
                out.insert(mp.to_string(), t.to_string());
            }
        }
        out
    }
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `name{a="x",b="y"} 1.5 [timestamp]` → parts.
fn parse_line(line: &str) -> Option<(String, Labels, f64)> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let end = loop {
            // key
            let mut key = String::new();
            let mut close = None;
            for (i, c) in chars.by_ref() {
                match c {
                    '=' => break,
                    '}' => {
                        close = Some(i);
                        break;
                    }
                    ',' | ' ' => {}
                    c => key.push(c),
                }
            }
            if let Some(i) = close {
                break i;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut escaped = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    (false, c) => value.push(c),
                }
            }
            labels.push((key, value));
        };
        body.get(end + 1..)?
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name.to_string(), labels, value))
}

/// Keeps recent samples so that rates cover a few seconds, whoever asks and how often.
#[derive(Debug, Default)]
pub struct Rates {
    samples: std::collections::VecDeque<(Instant, Sample)>,
}

impl Rates {
    /// Rates are measured over at most this long.
    const WINDOW: Duration = Duration::from_secs(10);

    /// Records `cur` taken at `at` and returns the oldest sample within the window, with its age.
    pub fn push(&mut self, at: Instant, cur: &Sample) -> Option<(Sample, f64)> {
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > Self::WINDOW)
        {
            self.samples.pop_front();
        }
        let prev = self
            .samples
            .front()
            .map(|(t, s)| (s.clone(), at.duration_since(*t).as_secs_f64()))
            .filter(|(_, dt)| *dt >= 0.5);
        self.samples.push_back((at, cur.clone()));
        prev
    }
}

/// Snapshot progress of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotView {
    pub done: f64,
    pub total: f64,
    pub rows_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    /// Its rows are all read (the estimate is replaced by the count at the end).
    pub finished: bool,
}

/// One captured table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableView {
    pub name: String,
    pub events: f64,
    pub events_per_s: Option<f64>,
    pub snapshot: Option<SnapshotView>,
}

/// The source half.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceView {
    pub retrying: bool,
    pub snapshot_running: bool,
    pub ms_behind: Option<f64>,
    pub last_event_age_s: Option<f64>,
    pub restarts: f64,
    /// Committed position: binlog file sequence and byte position.
    pub position: Option<(u64, u64)>,
    /// The server's end, as last polled.
    pub server_end: Option<(u64, u64)>,
    pub bytes_behind: Option<f64>,
    pub files_before: Option<f64>,
    pub expire_s: Option<f64>,
    pub purge_margin_s: Option<f64>,
    pub tables: Vec<TableView>,
}

/// One sink mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingView {
    pub name: String,
    pub topic: Option<String>,
    pub applied: f64,
    pub applied_per_s: Option<f64>,
    pub stale: f64,
    pub stale_per_s: Option<f64>,
    pub lag: Option<f64>,
    pub dead_letters: f64,
}

/// The sink half.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SinkView {
    pub retrying: bool,
    pub lag: Option<f64>,
    pub dead_letters: f64,
    pub mappings: Vec<MappingView>,
}

/// Everything both views show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub uptime_s: Option<f64>,
    /// Seconds the rates were measured over (none on the first sample).
    pub rate_window_s: Option<f64>,
    pub source: Option<SourceView>,
    pub sink: Option<SinkView>,
    /// What `/ready` says is not ready (empty: ready).
    pub not_ready: Vec<String>,
}

fn rate(cur: f64, prev: Option<f64>, dt: Option<f64>) -> Option<f64> {
    let (p, dt) = (prev?, dt?);
    (cur >= p && dt > 0.0).then(|| (cur - p) / dt)
}

fn seq_pos(file: Option<f64>, pos: Option<f64>) -> Option<(u64, u64)> {
    match (file, pos) {
        (Some(f), Some(p)) if f >= 0.0 && p >= 0.0 => Some((f as u64, p as u64)),
        _ => None,
    }
}

impl Status {
    /// The model of `cur`, with rates against `prev` (taken `dt` seconds earlier), at `now_s`.
    pub fn build(
        cur: &Sample,
        prev: Option<(&Sample, f64)>,
        now_s: f64,
        not_ready: Vec<String>,
    ) -> Status {
        let dt = prev.map(|(_, dt)| dt);
        let prev = prev.map(|(s, _)| s);
        let retrying = |c: &str| {
            cur.with_label(m::COMPONENT_RETRYING, m::COMPONENT_LABEL, c)
                .is_some_and(|v| v > 0.0)
        };
        let source =
            (cur.has_prefix("ecst_source_") || cur.has_prefix("ecst_snapshot_")).then(|| {
                let events = cur.by_label(m::SOURCE_EVENTS_TOTAL, m::TABLE_LABEL);
                let prev_events = prev.map(|p| p.by_label(m::SOURCE_EVENTS_TOTAL, m::TABLE_LABEL));
                let done = cur.by_label(m::SNAPSHOT_ROWS_DONE, m::TABLE_LABEL);
                let prev_done = prev.map(|p| p.by_label(m::SNAPSHOT_ROWS_DONE, m::TABLE_LABEL));
                let total = cur.by_label(m::SNAPSHOT_ROWS_TOTAL, m::TABLE_LABEL);
                let mut names: Vec<&String> = events
                    .keys()
                    .chain(done.keys())
                    .chain(total.keys())
                    .collect();
                names.sort();
                names.dedup();
                let snapshot_running = cur.value(m::SNAPSHOT_RUNNING).is_some_and(|v| v > 0.0);
                let position = seq_pos(
                    cur.value(m::SOURCE_BINLOG_FILE),
                    cur.value(m::SOURCE_BINLOG_POS),
                );
                let polled_end = seq_pos(
                    cur.value(m::SERVER_BINLOG_FILE),
                    cur.value(m::SERVER_BINLOG_POS),
                );
                let tables = names
                    .into_iter()
                    .map(|name| {
                        let ev = events.get(name).copied().unwrap_or(0.0);
                        let prev_ev = prev_events
                            .as_ref()
                            .map(|p| p.get(name).copied().unwrap_or(0.0));
                        let snapshot = done.get(name).map(|&d| {
                            let t = total.get(name).copied().unwrap_or(0.0);
                            let finished = !snapshot_running || d >= t && t > 0.0;
                            let rows_per_s = rate(
                                d,
                                prev_done
                                    .as_ref()
                                    .map(|p| p.get(name).copied().unwrap_or(0.0)),
                                dt,
                            )
                            .filter(|_| !finished);
                            let eta_s = rows_per_s
                                .filter(|r| *r > 0.0)
                                .map(|r| (t - d).max(0.0) / r);
                            SnapshotView {
                                done: d,
                                total: t,
                                rows_per_s,
                                eta_s,
                                finished,
                            }
                        });
                        TableView {
                            name: name.clone(),
                            events: ev,
                            events_per_s: rate(ev, prev_ev, dt),
                            snapshot,
                        }
                    })
                    .collect();
                SourceView {
                    retrying: retrying("source"),
                    snapshot_running,
                    ms_behind: cur.value(m::SOURCE_MS_BEHIND),
                    last_event_age_s: cur
                        .value(m::SOURCE_LAST_EVENT_TS)
                        .map(|t| (now_s - t).max(0.0)),
                    restarts: cur.value(m::SOURCE_RESTARTS_TOTAL).unwrap_or(0.0),
                    position,
                    // Polled every few seconds: the end is at least where the source already is.
                    server_end: polled_end.map(|end| position.map_or(end, |o| o.max(end))),
                    // Past the polled end, nothing the poll counted is still behind.
                    bytes_behind: cur.value(m::BINLOG_BYTES_BEHIND).map(|b| {
                        match (position, polled_end) {
                            (Some(o), Some(e)) if o >= e => 0.0,
                            _ => b,
                        }
                    }),
                    files_before: cur.value(m::BINLOG_FILES_BEFORE),
                    expire_s: cur.value(m::BINLOG_EXPIRE_SECONDS),
                    purge_margin_s: cur.value(m::BINLOG_PURGE_MARGIN_SECONDS),
                    tables,
                }
            });
        let sink = cur.has_prefix("ecst_sink_").then(|| {
            let applied = cur.by_label(m::SINK_APPLIED_TOTAL, m::MAPPING_LABEL);
            let prev_applied = prev.map(|p| p.by_label(m::SINK_APPLIED_TOTAL, m::MAPPING_LABEL));
            let stale = cur.by_label(m::SINK_STALE_TOTAL, m::MAPPING_LABEL);
            let prev_stale = prev.map(|p| p.by_label(m::SINK_STALE_TOTAL, m::MAPPING_LABEL));
            let topics = cur.mapping_topics();
            let lag = cur.by_label(m::SINK_CONSUMER_LAG, m::TOPIC_LABEL);
            let dlq = cur.by_label(m::SINK_DLQ_TOTAL, m::TOPIC_LABEL);
            let mut names: Vec<&String> = applied
                .keys()
                .chain(stale.keys())
                .chain(topics.keys())
                .collect();
            names.sort();
            names.dedup();
            let mappings = names
                .into_iter()
                .map(|name| {
                    let topic = topics.get(name).cloned();
                    let a = applied.get(name).copied().unwrap_or(0.0);
                    let s = stale.get(name).copied().unwrap_or(0.0);
                    MappingView {
                        name: name.clone(),
                        applied: a,
                        applied_per_s: rate(
                            a,
                            prev_applied
                                .as_ref()
                                .map(|p| p.get(name).copied().unwrap_or(0.0)),
                            dt,
                        ),
                        stale: s,
                        stale_per_s: rate(
                            s,
                            prev_stale
                                .as_ref()
                                .map(|p| p.get(name).copied().unwrap_or(0.0)),
                            dt,
                        ),
                        lag: topic.as_ref().and_then(|t| lag.get(t).copied()),
                        dead_letters: topic
                            .as_ref()
                            .and_then(|t| dlq.get(t).copied())
                            .unwrap_or(0.0),
                        topic,
                    }
                })
                .collect();
            SinkView {
                retrying: retrying("sink"),
                lag: (!lag.is_empty()).then(|| lag.values().sum()),
                dead_letters: dlq.values().sum(),
                mappings,
            }
        });
        Status {
            uptime_s: cur.value(m::PROCESS_START_TS).map(|t| (now_s - t).max(0.0)),
            rate_window_s: dt,
            source,
            sink,
            not_ready,
        }
    }
}

// ---- formatting shared by both views

const NONE: &str = "—";

/// `1234567` → `1,234,567`.
pub fn count(v: f64) -> String {
    if !v.is_finite() {
        return NONE.into();
    }
    let neg = v < 0.0;
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if neg { format!("-{out}") } else { out }
}

/// A rate per second, `—` when unknown.
pub fn per_s(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{}/s", count(v)),
        Some(v) => format!("{v:.1}/s"),
        None => NONE.into(),
    }
}

/// Seconds as `45s`, `12m 05s`, `3h 02m`, `2d 04h`.
pub fn duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return NONE.into();
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Bytes as `512 B`, `1.5 KiB`, `12.0 MiB`, `3.2 GiB`.
pub fn bytes(v: f64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if v < 1024.0 {
        return format!("{v:.0} B");
    }
    let mut x = v / 1024.0;
    let mut u = 0;
    while x >= 1024.0 && u < UNITS.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1} {}", UNITS[u])
}

fn position(p: Option<(u64, u64)>) -> String {
    p.map_or_else(|| NONE.into(), |(f, pos)| format!("{f:06}:{pos}"))
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| NONE.into(), f)
}

/// The source's state in a few words.
fn source_state(s: &SourceView) -> &'static str {
    if s.retrying {
        "retrying"
    } else if s.snapshot_running {
        "snapshotting"
    } else {
        "streaming"
    }
}

fn sink_state(s: &SinkView) -> &'static str {
    if s.retrying { "retrying" } else { "consuming" }
}

fn snapshot_cell(s: Option<&SnapshotView>) -> String {
    match s {
        None => NONE.into(),
        Some(s) if s.finished => format!("done, {} rows", count(s.done)),
        Some(s) => {
            let pct = if s.total > 0.0 {
                (s.done / s.total * 100.0).min(100.0)
            } else {
                0.0
            };
            format!(
                "{} / ~{} ({pct:.0}%) {} ETA {}",
                count(s.done),
                count(s.total),
                per_s(s.rows_per_s),
                opt(s.eta_s, duration)
            )
        }
    }
}

/// What the purge margin says, in words.
fn retention_cell(s: &SourceView) -> String {
    let files = match s.files_before {
        Some(f) if f < 0.0 => {
            return "the committed position's file is PURGED: re-snapshot needed".into();
        }
        Some(f) => format!("{} older files", count(f)),
        None => NONE.into(),
    };
    match (s.expire_s, s.purge_margin_s) {
        (Some(e), _) if e <= 0.0 => format!("{files}; the server never purges by age"),
        (Some(e), Some(mg)) => format!(
            "{files}; purge by age ({}) in ≥ {}",
            duration(e),
            duration(mg)
        ),
        _ => files,
    }
}

/// The lines of `ecst top`, each at most `width` characters.
pub fn render_text(s: &Status, source_of: &str, width: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut head = format!("ecst  {source_of}  up {}", opt(s.uptime_s, duration));
    if let Some(src) = &s.source {
        let _ = write!(head, "  source: {}", source_state(src));
    }
    if let Some(sink) = &s.sink {
        let _ = write!(head, "  sink: {}", sink_state(sink));
    }
    out.push(head);
    if s.not_ready.is_empty() {
        out.push("ready".into());
    } else {
        out.extend(s.not_ready.iter().map(|r| format!("NOT READY  {r}")));
    }
    out.push(String::new());
    if let Some(src) = &s.source {
        out.push(format!(
            "SOURCE  position {}  server end {}  behind {}  lag {}  last event {} ago  restarts {}",
            position(src.position),
            position(src.server_end),
            opt(src.bytes_behind, bytes),
            opt(src.ms_behind, |v| duration(v / 1000.0)),
            opt(src.last_event_age_s, duration),
            count(src.restarts),
        ));
        out.push(format!("        binlog retention: {}", retention_cell(src)));
        out.push(String::new());
        out.push(format!(
            "{:<32} {:>12} {:>14}  {}",
            "TABLE", "EVENTS/S", "EVENTS", "SNAPSHOT"
        ));
        for t in &src.tables {
            out.push(format!(
                "{:<32} {:>12} {:>14}  {}",
                t.name,
                per_s(t.events_per_s),
                count(t.events),
                snapshot_cell(t.snapshot.as_ref())
            ));
        }
        out.push(String::new());
    }
    if let Some(sink) = &s.sink {
        out.push(format!(
            "SINK  consumer lag {}  dead letters {}",
            opt(sink.lag, count),
            count(sink.dead_letters)
        ));
        out.push(String::new());
        out.push(format!(
            "{:<24} {:>11} {:>12} {:>9} {:>9} {:>10} {:>6}",
            "MAPPING", "APPLIED/S", "APPLIED", "STALE/S", "STALE", "LAG", "DLQ"
        ));
        for mp in &sink.mappings {
            out.push(format!(
                "{:<24} {:>11} {:>12} {:>9} {:>9} {:>10} {:>6}",
                mp.name,
                per_s(mp.applied_per_s),
                count(mp.applied),
                per_s(mp.stale_per_s),
                count(mp.stale),
                opt(mp.lag, count),
                count(mp.dead_letters)
            ));
        }
    }
    if s.source.is_none() && s.sink.is_none() {
        out.push("no source or sink metrics yet (starting?)".into());
    }
    out.into_iter()
        .map(|l| l.chars().take(width).collect())
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The status page: the same facts as `ecst top`, one HTML document that reloads itself.
pub fn render_html(s: &Status, refresh_s: u32) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{refresh_s}\"><title>ecst status</title><style>\
         body{{font:15px/1.4 sans-serif;margin:1.5em;color:#111}}\
         table{{border-collapse:collapse;margin:.5em 0 1.5em}}\
         th,td{{border:1px solid #999;padding:.25em .7em;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}th{{background:#eee}}\
         .bad{{color:#b00;font-weight:bold}}dl{{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}}\
         dt{{font-weight:bold}}dd{{margin:0}}</style></head><body>\n<h1>ecst</h1>\n"
    );
    let _ = write!(h, "<p id=\"state\">up {}", esc(&opt(s.uptime_s, duration)));
    if let Some(src) = &s.source {
        let _ = write!(h, " · source: {}", source_state(src));
    }
    if let Some(sink) = &s.sink {
        let _ = write!(h, " · sink: {}", sink_state(sink));
    }
    if let Some(w) = s.rate_window_s {
        let _ = write!(h, " · rates over the last {w:.0} s");
    }
    h.push_str("</p>\n");
    if s.not_ready.is_empty() {
        h.push_str("<p id=\"ready\">ready</p>\n");
    } else {
        h.push_str("<ul id=\"ready\" class=\"bad\">");
        for r in &s.not_ready {
            let _ = write!(h, "<li>not ready: {}</li>", esc(r));
        }
        h.push_str("</ul>\n");
    }
    if let Some(src) = &s.source {
        h.push_str("<h2>Source</h2>\n<dl id=\"source\">");
        let rows = [
            ("committed position", position(src.position)),
            ("server end", position(src.server_end)),
            ("behind", opt(src.bytes_behind, bytes)),
            (
                "lag behind MySQL",
                opt(src.ms_behind, |v| duration(v / 1000.0)),
            ),
            (
                "last event heard",
                opt(src.last_event_age_s, |v| format!("{} ago", duration(v))),
            ),
            ("binlog retention", retention_cell(src)),
            ("restarts", count(src.restarts)),
        ];
        for (k, v) in rows {
            let _ = write!(h, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&v));
        }
        h.push_str("</dl>\n<table id=\"tables\"><tr><th>table</th><th>events/s</th><th>events</th><th>snapshot</th></tr>\n");
        for t in &src.tables {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&t.name),
                esc(&per_s(t.events_per_s)),
                esc(&count(t.events)),
                esc(&snapshot_cell(t.snapshot.as_ref()))
            );
        }
        h.push_str("</table>\n");
    }
    if let Some(sink) = &s.sink {
        let _ = write!(
            h,
            "<h2>Sink</h2>\n<p id=\"sink\">consumer lag {} · dead letters {}</p>\n\
             <table id=\"mappings\"><tr><th>mapping</th><th>topic</th><th>applied/s</th><th>applied</th>\
             <th>stale/s</th><th>stale</th><th>lag</th><th>dead letters</th></tr>\n",
            esc(&opt(sink.lag, count)),
            esc(&count(sink.dead_letters))
        );
        for mp in &sink.mappings {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&mp.name),
                esc(mp.topic.as_deref().unwrap_or(NONE)),
                esc(&per_s(mp.applied_per_s)),
                esc(&count(mp.applied)),
                esc(&per_s(mp.stale_per_s)),
                esc(&count(mp.stale)),
                esc(&opt(mp.lag, count)),
                esc(&count(mp.dead_letters))
            );
        }
        h.push_str("</table>\n");
    }
    if s.source.is_none() && s.sink.is_none() {
        h.push_str("<p>no source or sink metrics yet (starting?)</p>\n");
    }
    h.push_str("<p><a href=\"/metrics\">/metrics</a> · <a href=\"/ready\">/ready</a> · <a href=\"/health\">/health</a></p>\n</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE_1: &str = r#"# HELP ecst_source_events_total Change events
# TYPE ecst_source_events_total counter
ecst_source_events_total{table="test.users"} 100
ecst_source_events_total{table="test.product"} 3
ecst_snapshot_running 1
ecst_snapshot_rows_done{table="test.users"} 4
ecst_snapshot_rows_total{table="test.users"} 4
ecst_snapshot_rows_done{table="test.product"} 1000
ecst_snapshot_rows_total{table="test.product"} 5000
ecst_source_binlog_file_seq 3
ecst_source_binlog_position 1200
ecst_source_server_binlog_file_seq 4
ecst_source_server_binlog_position 800
ecst_source_binlog_bytes_behind 2148
ecst_source_binlog_files_before_position 2
ecst_source_binlog_expire_seconds 604800
ecst_source_binlog_purge_margin_seconds 600000
ecst_component_retrying{component="source"} 0
ecst_component_retrying{component="sink"} 1
ecst_sink_applied_total{mapping="users"} 50
ecst_sink_stale_skipped_total{mapping="users"} 2
ecst_sink_mapping_info{mapping="users",topic="ecst.test.users"} 1
ecst_sink_mapping_info{mapping="products",topic="ecst.test.product"} 1
ecst_sink_consumer_lag{topic="ecst.test.users"} 7
ecst_sink_consumer_lag{topic="ecst.test.product"} 0
ecst_sink_dead_letter_total{topic="ecst.test.users"} 1
process_start_time_seconds 1000
weird{a="x\"y,z}",b="\\"} 2.5 1700000000
"#;

    fn scrape_2() -> String {
        SCRAPE_1
            .replace("{table=\"test.users\"} 100", "{table=\"test.users\"} 120")
            .replace(
                "rows_done{table=\"test.product\"} 1000",
                "rows_done{table=\"test.product\"} 2000",
            )
            .replace(
                "applied_total{mapping=\"users\"} 50",
                "applied_total{mapping=\"users\"} 60",
            )
    }

    #[test]
    fn label_values_with_escaped_quotes_commas_and_braces_parse() {
        let s = Sample::parse(SCRAPE_1);
        assert_eq!(s.with_label("weird", "a", "x\"y,z}"), Some(2.5));
        assert_eq!(s.with_label("weird", "b", "\\"), Some(2.5));
        assert_eq!(s.value("ecst_snapshot_running"), Some(1.0));
    }

    #[test]
    fn rates_and_the_snapshot_eta_come_from_two_samples() {
        let a = Sample::parse(SCRAPE_1);
        let b = Sample::parse(&scrape_2());
        let st = Status::build(&b, Some((&a, 2.0)), 1100.0, vec![]);
        assert_eq!(st.uptime_s, Some(100.0));
        let src = st.source.as_ref().unwrap();
        assert!(src.snapshot_running);
        let users = src.tables.iter().find(|t| t.name == "test.users").unwrap();
        assert_eq!(users.events_per_s, Some(10.0));
        assert!(users.snapshot.as_ref().unwrap().finished, "done == total");
        let product = src
            .tables
            .iter()
            .find(|t| t.name == "test.product")
            .unwrap();
        let snap = product.snapshot.as_ref().unwrap();
        assert!(!snap.finished);
        assert_eq!(snap.rows_per_s, Some(500.0));
        assert_eq!(snap.eta_s, Some(6.0));
        let sink = st.sink.as_ref().unwrap();
        assert!(sink.retrying);
        assert_eq!(sink.lag, Some(7.0));
        let users = sink.mappings.iter().find(|m| m.name == "users").unwrap();
        assert_eq!(users.applied_per_s, Some(5.0));
        assert_eq!(users.lag, Some(7.0));
        assert_eq!(users.dead_letters, 1.0);
        let products = sink.mappings.iter().find(|m| m.name == "products").unwrap();
        assert_eq!(products.applied, 0.0);
        assert_eq!(products.lag, Some(0.0));
    }

    #[test]
    fn a_counter_that_went_down_has_no_rate_and_the_first_sample_has_none() {
        let a = Sample::parse(&scrape_2());
        let b = Sample::parse(SCRAPE_1);
        let st = Status::build(&b, Some((&a, 2.0)), 1100.0, vec![]);
        let users = &st.source.unwrap().tables;
        assert!(
            users
                .iter()
                .all(|t| t.name != "test.users" || t.events_per_s.is_none())
        );
        let st = Status::build(&b, None, 1100.0, vec![]);
        assert!(
            st.source
                .unwrap()
                .tables
                .iter()
                .all(|t| t.events_per_s.is_none())
        );
    }

    #[test]
    fn the_text_view_shows_positions_retention_tables_and_mappings_within_the_width() {
        let a = Sample::parse(SCRAPE_1);
        let b = Sample::parse(&scrape_2());
        let st = Status::build(
            &b,
            Some((&a, 2.0)),
            1100.0,
            vec!["sink: retrying for 3 s".into()],
        );
        let lines = render_text(&st, "http://x:1", 200);
        let text = lines.join("\n");
        assert!(
            text.contains("position 000003:1200  server end 000004:800  behind 2.1 KiB"),
            "{text}"
        );
        assert!(
            text.contains("2 older files; purge by age (7d 00h) in ≥ 6d 22h"),
            "{text}"
        );
        assert!(text.contains("NOT READY  sink: retrying for 3 s"), "{text}");
        let product = lines
            .iter()
            .find(|l| l.starts_with("test.product"))
            .unwrap();
        assert!(
            product.contains("2,000 / ~5,000 (40%) 500/s ETA 6s"),
            "{product}"
        );
        let users = lines.iter().find(|l| l.starts_with("users ")).unwrap();
        assert!(
            users.contains("5.0/s") && users.contains(" 60 ") && users.ends_with(" 1"),
            "{users}"
        );
        assert!(
            render_text(&st, "u", 20)
                .iter()
                .all(|l| l.chars().count() <= 20)
        );
        // A server end polled before the source's last commit is shown as the source's position.
        let ahead = SCRAPE_1.replace(
            "ecst_source_binlog_file_seq 3",
            "ecst_source_binlog_file_seq 4",
        );
        let st = Status::build(&Sample::parse(&ahead), None, 1100.0, vec![]);
        let src = st.source.unwrap();
        assert_eq!(src.server_end, Some((4, 1200)));
        assert_eq!(src.bytes_behind, Some(0.0));
    }

    #[test]
    fn the_page_escapes_names_and_says_when_the_position_is_purged() {
        let text = SCRAPE_1
            .replace("files_before_position 2", "files_before_position -1")
            .replace("test.product", "<b>x</b>");
        let st = Status::build(&Sample::parse(&text), None, 1100.0, vec![]);
        let html = render_html(&st, 2);
        assert!(
            html.contains("&lt;b&gt;x&lt;/b&gt;") && !html.contains("<b>x"),
            "{html}"
        );
        assert!(html.contains("PURGED"), "{html}");
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
    }

    #[test]
    fn figures_are_formatted_for_people() {
        assert_eq!(count(1_234_567.0), "1,234,567");
        assert_eq!(count(-1000.0), "-1,000");
        assert_eq!(count(12.0), "12");
        assert_eq!(duration(59.4), "59s");
        assert_eq!(duration(725.0), "12m 05s");
        assert_eq!(duration(3.0 * 86400.0 + 7200.0), "3d 02h");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(per_s(Some(1234.0)), "1,234/s");
        assert_eq!(per_s(None), "—");
    }

    #[test]
    fn rates_cover_at_most_the_window_and_need_half_a_second() {
        let mut r = Rates::default();
        let t0 = Instant::now();
        let s = Sample::parse(SCRAPE_1);
        assert!(r.push(t0, &s).is_none());
        assert!(r.push(t0 + Duration::from_millis(100), &s).is_none());
        let (_, dt) = r.push(t0 + Duration::from_secs(2), &s).unwrap();
        assert!((dt - 2.0).abs() < 1e-9);
        let (_, dt) = r.push(t0 + Duration::from_secs(30), &s).unwrap_or_default();
        assert!(dt == 0.0, "samples older than the window are dropped: {dt}");
    }
}
