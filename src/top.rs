//! `ecst top`: a live terminal view of a running ecst, read from its metrics endpoint.
//!
//! Design: it is a client of `/metrics` and `/ready` only (the same text Prometheus scrapes), so
//! it watches a process on another host as well as the local one and needs no configuration
//! beyond the address. Every interval it scrapes, builds [`crate::status::Status`] against the
//! samples of the last seconds (rates), and redraws the whole screen in place. An endpoint that
//! cannot be reached is shown as such, with the cause and the address, and the view keeps
//! trying: an ecst that restarts comes back on screen by itself.
//!
//! The terminal is put in raw mode on the alternate screen and restored by one guard's `Drop`,
//! whichever way the loop ends (`q`, Esc, Ctrl-C — which raw mode delivers as a key — SIGTERM,
//! SIGINT, or an error). Keys are read on a thread of their own (crossterm's reads block) that
//! stops when the loop does. Without a terminal it refuses, and `--once` prints one frame as
//! text for scripts (exit status 1 when the endpoint cannot be reached).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossterm::{cursor, event, execute, queue, terminal};

use crate::error::{Classify, ErrorClass};
use crate::status::{Rates, Sample, Status, render_text};

/// What `ecst top` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL of the metrics listener, e.g. `http://127.0.0.1:9187`.
    pub url: String,
    /// Time between refreshes.
    pub interval: Duration,
    /// Print one frame as text and exit.
    pub once: bool,
}

/// Why `ecst top` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The endpoint does not answer (with `--once`).
    #[error("cannot reach {url}: {detail}; is ecst running, with metrics.listen at this address?")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// What the connection said.
        detail: String,
    },
    /// Not run in a terminal.
    #[error(
        "ecst top needs a terminal (stdout is not one); `ecst top --once` prints one frame as text"
    )]
    NotATerminal,
    /// The terminal refused raw mode or a write.
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(String),
}

impl Classify for TopError {
    fn class(&self) -> ErrorClass {
        match self {
            TopError::Unreachable { .. } => ErrorClass::Transient,
            TopError::NotATerminal | TopError::Terminal(_) | TopError::Client(_) => {
                ErrorClass::Definite
            }
        }
    }
}

/// The base URL for a `metrics.listen` address: a wildcard listener is asked on loopback.
pub fn url_for_listen(listen: &str) -> String {
    let addr = listen
        .strip_prefix("0.0.0.0:")
        .map(|p| format!("127.0.0.1:{p}"))
        .or_else(|| listen.strip_prefix("[::]:").map(|p| format!("[::1]:{p}")))
        .unwrap_or_else(|| listen.to_string());
    format!("http://{addr}")
}

/// One scrape: the metrics and what `/ready` says is not ready.
async fn scrape(client: &reqwest::Client, url: &str) -> Result<(Sample, Vec<String>), TopError> {
    let unreachable = |e: reqwest::Error| TopError::Unreachable {
        url: format!("{url}/metrics"),
        detail: error_chain(&e),
    };
    let resp = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .map_err(unreachable)?;
    if !resp.status().is_success() {
        return Err(TopError::Unreachable {
            url: format!("{url}/metrics"),
            detail: format!("HTTP {}", resp.status()),
        });
    }
    let sample = Sample::parse(&resp.text().await.map_err(unreachable)?);
    // `/ready` answers 503 with one reason per line after "not ready".
    let not_ready = match client.get(format!("{url}/ready")).send().await {
        Ok(r) if r.status().is_success() => Vec::new(),
        Ok(r) => r
            .text()
            .await
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        Err(e) => vec![format!("/ready: {}", error_chain(&e))],
    };
    Ok((sample, not_ready))
}

/// What a failed request comes down to: its deepest cause ("Connection refused (os error
/// 111)"), or that nothing answered in time.
fn error_chain(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "no answer within 2 s".into();
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(c) = cause.source() {
        cause = c;
    }
    cause.to_string()
}

/// `text` cut into lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(width.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

/// The frame for one refresh.
fn frame(
    outcome: &Result<(Sample, Vec<String>), TopError>,
    rates: &mut Rates,
    opts: &Options,
    width: usize,
) -> Vec<String> {
    match outcome {
        Ok((sample, not_ready)) => {
            let prev = rates.push(Instant::now(), sample);
            let st = Status::build(
                sample,
                prev.as_ref().map(|(s, dt)| (s, *dt)),
                crate::metrics::now_s(),
                not_ready.clone(),
            );
            render_text(&st, &opts.url, width)
        }
        Err(e) => {
            *rates = Rates::default();
            let mut lines = vec![format!("ecst  {}", opts.url), String::new()];
            lines.extend(wrap(&e.to_string(), width));
            lines.push(format!("retrying every {} ms", opts.interval.as_millis()));
            lines
        }
    }
}

fn client() -> Result<reqwest::Client, TopError> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| TopError::Client(e.to_string()))
}

/// Runs `ecst top` until quit.
pub async fn run(opts: Options) -> Result<(), TopError> {
    let client = client()?;
    let url = opts.url.trim_end_matches('/').to_string();
    let opts = Options { url, ..opts };
    if opts.once {
        return once(&client, &opts).await;
    }
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let _screen = Screen::enter()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || read_keys(&stop, &keys_tx))
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut rates = Rates::default();
    let mut tick = tokio::time::interval(opts.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Result<(Sample, Vec<String>), TopError>> = None;
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                let outcome = scrape(&client, &opts.url).await;
                if let Err(e) = draw(&frame(&outcome, &mut rates, &opts, width()), &opts) {
                    break Err(e);
                }
                last = Some(outcome);
            }
            k = keys.recv() => match k {
                Some(Key::Quit) | None => break Ok(()),
                Some(Key::Redraw) => {
                    if let Some(outcome) = &last {
                        // A redraw must not count as a sample: rates stay as measured.
                        let mut scratch = Rates::default();
                        if let Err(e) = draw(&frame(outcome, &mut scratch, &opts, width()), &opts) {
                            break Err(e);
                        }
                    }
                }
            },
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
        }
    };
    stop.store(true, Ordering::Relaxed);
    if reader.join().is_err() {
        tracing::debug!("the key reader thread panicked");
    }
    result
}

/// `--once`: two scrapes a second apart (for rates), one frame printed.
async fn once(client: &reqwest::Client, opts: &Options) -> Result<(), TopError> {
    let mut rates = Rates::default();
    let (first, _) = scrape(client, &opts.url).await?;
    rates.push(Instant::now(), &first);
    // The interval the rates are measured over, not a wait for a condition.
    tokio::time::sleep(opts.interval.max(Duration::from_millis(500))).await;
    let outcome = Ok(scrape(client, &opts.url).await?);
    let mut out = std::io::stdout().lock();
    for l in frame(&outcome, &mut rates, opts, 200) {
        writeln!(out, "{l}")?;
    }
    Ok(())
}

fn width() -> usize {
    terminal::size().map_or(100, |(w, _)| usize::from(w))
}

/// Draws `lines` from the top-left, clearing what the previous frame left, with a footer.
fn draw(lines: &[String], opts: &Options) -> Result<(), TopError> {
    let (w, h) = terminal::size().unwrap_or((100, 40));
    let mut out = std::io::stdout().lock();
    queue!(out, cursor::MoveTo(0, 0))?;
    let room = usize::from(h).saturating_sub(2);
    for l in lines.iter().take(room) {
        queue!(out, terminal::Clear(terminal::ClearType::UntilNewLine))?;
        write!(out, "{l}\r\n")?;
    }
    queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown))?;
    let footer = format!(
        "q quit · every {} ms · {}",
        opts.interval.as_millis(),
        opts.url
    );
    queue!(out, cursor::MoveTo(0, h.saturating_sub(1)))?;
    write!(
        out,
        "{}",
        footer.chars().take(usize::from(w)).collect::<String>()
    )?;
    out.flush()?;
    Ok(())
}

enum Key {
    Quit,
    Redraw,
}

/// Reads keys until `stop`; q, Q, Esc and Ctrl-C quit, a resize redraws.
fn read_keys(stop: &AtomicBool, tx: &tokio::sync::mpsc::UnboundedSender<Key>) {
    use event::{Event, KeyCode, KeyEventKind, KeyModifiers};
    while !stop.load(Ordering::Relaxed) {
        match event::poll(Duration::from_millis(100)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                let _ = tx.send(Key::Quit);
                return;
            }
        }
        let key = match event::read() {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => match k.code {
                KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Key::Quit),
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                    Some(Key::Quit)
                }
                _ => None,
            },
            Ok(Event::Resize(..)) => Some(Key::Redraw),
            Ok(_) => None,
            Err(_) => Some(Key::Quit),
        };
        if let Some(k) = key
            && tx.send(k).is_err()
        {
            return;
        }
    }
}

/// Raw mode on the alternate screen, restored on drop.
struct Screen;

impl Screen {
    fn enter() -> Result<Screen, TopError> {
        terminal::enable_raw_mode()?;
        let screen = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_asked_on_loopback() {
        assert_eq!(url_for_listen("0.0.0.0:9187"), "http://127.0.0.1:9187");
        assert_eq!(url_for_listen("[::]:9187"), "http://[::1]:9187");
        assert_eq!(url_for_listen("10.0.0.5:9187"), "http://10.0.0.5:9187");
    }

    #[test]
    fn an_unreachable_endpoint_shows_the_address_the_cause_and_that_it_retries() {
        let opts = Options {
            url: "http://127.0.0.1:1".into(),
            interval: Duration::from_millis(1000),
            once: false,
        };
        let err = Err(TopError::Unreachable {
            url: "http://127.0.0.1:1/metrics".into(),
            detail: "Connection refused".into(),
        });
        let lines = frame(&err, &mut Rates::default(), &opts, 200).join("\n");
        assert!(
            lines.contains("cannot reach http://127.0.0.1:1/metrics: Connection refused"),
            "{lines}"
        );
        assert!(lines.contains("retrying every 1000 ms"), "{lines}");
        let narrow = frame(&err, &mut Rates::default(), &opts, 30);
        assert!(narrow.iter().all(|l| l.chars().count() <= 30));
        assert!(
            narrow.concat().contains("Connection refused"),
            "wrapped, not cut: {narrow:?}"
        );
    }
}
