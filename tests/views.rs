//! Seeing ecst live: `ecst top` driven in a real terminal (tmux), the status page in a real
//! browser (headless Chromium, its screenshot read back by OCR), and the binlog retention figures
//! both show, against a server whose binlog is rotated under them.

use std::path::PathBuf;
use std::process::Command as StdCommand;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::common::*;

const T: Duration = Duration::from_secs(90);

/// Where the tests leave what they saw (ignored by git, kept after the run).
fn artifacts() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The value of an unlabelled series, or of the one whose labels contain `labels`.
fn series(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let Some(rest) = l.strip_prefix(name) else {
                return false;
            };
            if labels.is_empty() {
                rest.starts_with(' ')
            } else {
                rest.starts_with('{') && rest.contains(labels)
            }
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A pipeline of the seed's tables with its metrics listener, its snapshot applied.
async fn running_pipeline() -> Result<(String, u16, Captured)> {
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let port = free_port()?;
    let cfg = write_config(&tc, true, Some(port))?;
    let run = spawn_captured(&cfg, "run", &[], "warn")?;
    wait_for("the snapshot applied and ecst ready", T, || async {
        let m = http_get(port, "/metrics").await.unwrap_or_default();
        let ready = http_get(port, "/ready").await.unwrap_or_default();
        Ok(
            (series(&m, "ecst_sink_applied_total", "mapping=\"user_in_orders\"").unwrap_or(0.0)
                > 0.0
                && ready.starts_with("HTTP/1.1 200"))
            .then_some(()),
        )
    })
    .await?;
    Ok((db, port, run))
}

/// A private tmux server (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Result<Tmux> {
        let t = Tmux {
            socket: unique("ecst-top"),
        };
        t.run(&["-f", "/dev/null", "start-server"])
            .context("tmux is needed for this test (dev/stack tools installs it)")?;
        Ok(t)
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = StdCommand::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "tmux {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `cmd` in a new 160x45 window `name`, through a shell that prints its exit status
    /// when it ends (what a person at that terminal would see) and then waits.
    fn open(&self, name: &str, cmd: &str) -> Result<()> {
        let wrapped = format!("{cmd}; echo ecst-top-exited-$?; sleep 600");
        self.run(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "160",
            "-y",
            "45",
            &wrapped,
        ])?;
        Ok(())
    }

    fn screen(&self, name: &str) -> Result<String> {
        self.run(&["capture-pane", "-p", "-t", name])
    }

    fn keys(&self, name: &str, keys: &str) -> Result<()> {
        self.run(&["send-keys", "-t", name, keys])?;
        Ok(())
    }

    /// `Some(status)` once the command has exited, as the shell printed it.
    fn exit_status(&self, name: &str) -> Result<Option<i32>> {
        let screen = self.screen(name)?;
        Ok(screen
            .lines()
            .find_map(|l| l.trim().strip_prefix("ecst-top-exited-"))
            .and_then(|c| c.parse().ok()))
    }
}

impl Tmux {
    /// Waits for the pane's command to exit after `key`; on timeout, says what the pane shows.
    async fn wait_exit(&self, name: &str, key: &str) -> Result<i32> {
        let r = wait_for(
            &format!("ecst top to exit on {key}"),
            Duration::from_secs(20),
            || async { self.exit_status(name) },
        )
        .await;
        r.with_context(|| format!("the screen:\n{}", self.screen(name).unwrap_or_default()))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = StdCommand::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The figure in `column` (0-based, whitespace-separated) of the screen line starting `row `.
fn cell(screen: &str, row: &str, column: usize) -> Option<f64> {
    screen
        .lines()
        .find(|l| l.starts_with(&format!("{row} ")))
        .and_then(|l| l.split_whitespace().nth(column))
        .and_then(|c| c.trim_end_matches("/s").replace(',', "").parse().ok())
}

#[tokio::test]
async fn ecst_top_in_a_terminal_shows_tables_mappings_and_the_binlog_live_and_quits_on_q()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let (db, port, mut run) = running_pipeline().await?;
    let tmux = Tmux::new()?;
    let top = format!(
        "{} top --url http://127.0.0.1:{port} --interval-ms 500",
        ecst_bin()
    );
    tmux.open("top", &top)?;
    let users = format!("{db}.users");
    let first = wait_for("ecst top to show the tables and mappings", T, || async {
        let s = tmux.screen("top")?;
        Ok((s.contains(&users)
            && s.contains(&format!("{db}.product"))
            && s.lines().any(|l| l.starts_with("user_in_orders "))
            && s.contains("position 0")
            && s.contains("server end 0"))
        .then_some(s))
    })
    .await
    .with_context(|| format!("the screen:\n{}", tmux.screen("top").unwrap_or_default()))?;
    assert!(
        first.contains("source: streaming") && first.contains("sink: consuming"),
        "{first}"
    );
    assert!(
        first.contains("TABLE") && first.contains("MAPPING") && first.contains("q quit"),
        "{first}"
    );
    // The snapshot of users (4 rows) is done; the mapping applied its events.
    let users_row = first
        .lines()
        .find(|l| l.starts_with(&users))
        .unwrap_or_default();
    assert!(users_row.contains("done, 4 rows"), "{users_row}");
    let events_before = cell(&first, &users, 2).context("events of users")?;
    let applied_before = cell(&first, "user_in_orders", 2).context("applied of users")?;
    // A change in MySQL shows up on the screen by itself.
    sql(format!(
        "UPDATE `{db}`.users SET email = 'top@x' WHERE id = 1"
    ))
    .await?;
    let later = wait_for("the change counted on screen", T, || async {
        let s = tmux.screen("top")?;
        // ... with its rate measured (a figure, not "—").
        Ok((cell(&s, &users, 2) == Some(events_before + 1.0)
            && cell(&s, &users, 1).is_some_and(|r| r > 0.0)
            && cell(&s, "user_in_orders", 2).is_some_and(|a| a > applied_before))
        .then_some(s))
    })
    .await?;
    std::fs::write(artifacts()?.join("ecst-top.txt"), &later)?;
    // The figures on screen are the process's own: compare with its /metrics.
    let m = http_get(port, "/metrics").await?;
    let events = series(
        &m,
        "ecst_source_events_total",
        &format!("table=\"{users}\""),
    );
    assert_eq!(events, Some(events_before + 1.0), "{m}");
    tmux.keys("top", "q")?;
    let code = tmux.wait_exit("top", "q").await?;
    assert_eq!(code, 0, "ecst top exit status");
    // The terminal is restored: the alternate screen is left, the shell's screen is back.
    let after = tmux.screen("top")?;
    assert!(
        !after.contains("MAPPING"),
        "the view must be gone after q:\n{after}"
    );

    // Pointed at nothing, it says so and keeps trying; Ctrl-C quits.
    let nothing = free_port()?;
    tmux.open(
        "nothing",
        &format!(
            "{} top --url http://127.0.0.1:{nothing} --interval-ms 500",
            ecst_bin()
        ),
    )?;
    let s = wait_for("ecst top to say the endpoint is unreachable", T, || async {
        let s = tmux.screen("nothing")?;
        Ok(s.contains("retrying every 500 ms").then_some(s))
    })
    .await?;
    assert!(
        s.contains(&format!("cannot reach http://127.0.0.1:{nothing}/metrics"))
            && s.to_lowercase().contains("connection refused"),
        "{s}"
    );
    tmux.keys("nothing", "C-c")?;
    let code = tmux.wait_exit("nothing", "Ctrl-C").await?;
    assert_eq!(code, 0);
    // And once, without a terminal, for scripts: one frame, or status 1 with the cause.
    let once = tokio::process::Command::new(ecst_bin())
        .args([
            "top",
            "--once",
            "--url",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&once.stdout);
    assert!(once.status.success() && text.contains(&users), "{text}");
    let down = tokio::process::Command::new(ecst_bin())
        .args([
            "top",
            "--once",
            "--url",
            &format!("http://127.0.0.1:{nothing}"),
        ])
        .output()
        .await?;
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach"));
    run.child.kill().await?;
    Ok(())
}

/// Runs headless Chromium on `url` with `args`, in a profile of its own.
async fn chromium(url: &str, args: &[String]) -> Result<std::process::Output> {
    let profile = std::env::temp_dir().join(unique("chromium"));
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .arg(url)
        .output()
        .await
        .context("chromium is needed for this test (dev/stack tools installs it)")?;
    let _ = std::fs::remove_dir_all(&profile);
    if !out.status.success() {
        bail!("chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// `s` with the characters OCR mistakes for one another made one: what
/// a reader of the picture cannot tell apart is not a test failure.
fn ocr_fold(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'l' | 'I' | '|' | 'i' | '!' => '1',
            'O' | 'o' | 'D' => '0',
            'B' => '8',
            'S' | 's' => '5',
            'Z' | 'z' => '2',
            'g' | 'q' => '9',
            c => c,
        })
        .collect()
}

#[test]
fn the_name_ocr_misread_in_a_ci_run_matches_once_look_alikes_are_folded() {
    // Read from a CI run's screenshot of `t_9188645abda1.users`.
    let read = "t_9188645abdal.users 0.0/s 5 | done, 4 rows";
    assert!(!read.contains("t_9188645abda1.users"));
    assert!(ocr_fold(read).contains(&ocr_fold("t_9188645abda1.users")));
    assert!(!ocr_fold(read).contains(&ocr_fold("t_9188645abda2.users")));
}

/// Width and height from a PNG's header.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    (png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n")).then(|| {
        let be = |i: usize| u32::from_be_bytes([png[i], png[i + 1], png[i + 2], png[i + 3]]);
        (be(16), be(20))
    })
}

#[tokio::test]
async fn the_status_page_in_a_real_browser_shows_the_tables_and_figures_and_its_screenshot_reads_back()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let (db, port, mut run) = running_pipeline().await?;
    let users = format!("{db}.users");
    sql(format!(
        "UPDATE `{db}`.users SET email = 'page@x' WHERE id = 2"
    ))
    .await?;
    let m = wait_for("the change applied", T, || async {
        let m = http_get(port, "/metrics").await?;
        Ok((series(
            &m,
            "ecst_source_events_total",
            &format!("table=\"{users}\""),
        ) == Some(5.0)
            && series(&m, "ecst_source_server_binlog_file_seq", "").is_some())
        .then_some(m))
    })
    .await?;
    let url = format!("http://127.0.0.1:{port}/");
    // The DOM as the browser built it.
    let dom = chromium(&url, &["--dump-dom".into()]).await?;
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("<table id=\"tables\">") && dom.contains("<table id=\"mappings\">"),
        "{dom}"
    );
    let row = |first: &str| -> Option<Vec<String>> {
        let start = dom.find(&format!("<tr><td>{first}</td>"))?;
        let end = start + dom[start..].find("</tr>")?;
        Some(
            dom[start..end]
                .split("<td>")
                .skip(1)
                .map(|c| c.trim_end_matches("</td>").to_string())
                .collect(),
        )
    };
    let t = row(&users).context("the users row")?;
    assert_eq!(t[2], "5", "events of users: {t:?}");
    assert_eq!(t[3], "done, 4 rows", "{t:?}");
    let mp = row("user_in_orders").context("the users mapping row")?;
    assert!(mp[1].ends_with(&format!(".{db}.users")), "{mp:?}");
    let applied =
        series(&m, "ecst_sink_applied_total", "mapping=\"user_in_orders\"").unwrap_or(0.0);
    assert!(
        mp[3].replace(',', "").parse::<f64>()? >= applied,
        "{mp:?} vs {applied}"
    );
    let file = series(&m, "ecst_source_binlog_file_seq", "").context("file seq")?;
    assert!(
        dom.contains(&format!("{:06}:", file as u64)),
        "the position is shown: {dom}"
    );
    assert!(
        dom.contains("http-equiv=\"refresh\""),
        "the page reloads itself"
    );
    // The picture: the right size, and what a reader sees in it.
    let shot = artifacts()?.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,900".into(),
        ],
    )
    .await?;
    let png = std::fs::read(&shot).with_context(|| format!("{} not written", shot.display()))?;
    assert_eq!(png_size(&png), Some((1280, 900)));
    let ocr = StdCommand::new("tesseract")
        .arg(&shot)
        .arg("stdout")
        .output()
        .context("tesseract is needed for this test (dev/stack tools installs it)")?;
    let seen = String::from_utf8_lossy(&ocr.stdout).to_string();
    std::fs::write(artifacts()?.join("status-page.ocr.txt"), &seen)?;
    for word in [
        "Source",
        "Sink",
        "committed position",
        "events/s",
        "mapping",
        "dead letters",
        "done, 4 rows",
    ] {
        assert!(
            seen.contains(word),
            "`{word}` not read in the screenshot:\n{seen}"
        );
    }
    // The name is random hex, where OCR confuses look-alikes (`1`/`l`
    // was seen): it is compared with those folded on both sides.
    let name = ocr_fold(&format!("{db}.users"));
    assert!(
        ocr_fold(&seen).contains(&name),
        "the table's name not read:\n{seen}"
    );
    // Its row, as read from the picture, carries its figure: 5 events.
    let users_line = seen
        .lines()
        .find(|l| ocr_fold(l).contains(&name))
        .unwrap_or_default();
    assert!(
        users_line.split_whitespace().any(|w| w == "5"),
        "the users row's events not read: {users_line:?}\n{seen}"
    );
    run.child.kill().await?;
    Ok(())
}

#[tokio::test]
async fn the_binlog_figures_follow_a_rotation_and_a_caught_up_source_keeps_the_whole_expire_age()
-> Result<()> {
    // Exclusive: the binlog is rotated and the server's expire setting changed for everyone.
    let _exclusive = STACK_LOCK.write().await;
    let mut admin = admin().await?;
    use mysql_async::prelude::Queryable;
    let saved: Option<String> = admin
        .query_first("SELECT @@GLOBAL.binlog_expire_logs_seconds")
        .await?;
    // 30 days: no file of a test stack is that old, so nothing is purged by this.
    admin
        .query_drop("SET GLOBAL binlog_expire_logs_seconds = 2592000")
        .await?;
    let outcome = async {
        let (db, port, mut run) = running_pipeline().await?;
        sql(format!(
            "UPDATE `{db}`.users SET email = 'rot@x' WHERE id = 3"
        ))
        .await?;
        let gauge = |m: &str, n: &str| series(m, n, "");
        // Caught up in the active file: nothing behind, the whole expire age ahead.
        let m = wait_for("the poller to see the source caught up", T, || async {
            let m = http_get(port, "/metrics").await?;
            Ok((gauge(&m, "ecst_source_binlog_bytes_behind") == Some(0.0)
                && gauge(&m, "ecst_source_server_binlog_file_seq")
                    == gauge(&m, "ecst_source_binlog_file_seq"))
            .then_some(m))
        })
        .await?;
        anyhow::ensure!(
            gauge(&m, "ecst_source_binlog_expire_seconds") == Some(2_592_000.0),
            "{m}"
        );
        anyhow::ensure!(
            gauge(&m, "ecst_source_binlog_purge_margin_seconds") == Some(2_592_000.0),
            "{m}"
        );
        let ours = gauge(&m, "ecst_source_binlog_file_seq").context("file seq")?;
        let before =
            gauge(&m, "ecst_source_binlog_files_before_position").context("files before")?;
        // Rotate: the server's end moves to a new file, and the source follows it there.
        sql("FLUSH BINARY LOGS").await?;
        wait_for(
            "the poller and the source to follow the rotation",
            T,
            || async {
                let m = http_get(port, "/metrics").await?;
                Ok(
                    (gauge(&m, "ecst_source_server_binlog_file_seq") == Some(ours + 1.0)
                        && gauge(&m, "ecst_source_binlog_file_seq") == Some(ours + 1.0)
                        && gauge(&m, "ecst_source_binlog_files_before_position")
                            == Some(before + 1.0))
                    .then_some(()),
                )
            },
        )
        .await?;
        // A change in the new file: caught up again, the whole age ahead again.
        sql(format!(
            "UPDATE `{db}`.users SET email = 'rot2@x' WHERE id = 3"
        ))
        .await?;
        let m = wait_for(
            "the committed position at the new file's end",
            T,
            || async {
                let m = http_get(port, "/metrics").await?;
                Ok((gauge(&m, "ecst_source_binlog_bytes_behind") == Some(0.0)
                    && gauge(&m, "ecst_source_server_binlog_position")
                        == gauge(&m, "ecst_source_binlog_position"))
                .then_some(m))
            },
        )
        .await?;
        anyhow::ensure!(
            gauge(&m, "ecst_source_binlog_purge_margin_seconds") == Some(2_592_000.0),
            "{m}"
        );
        run.child.kill().await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let restore = saved.unwrap_or_else(|| "0".into());
    admin
        .query_drop(format!("SET GLOBAL binlog_expire_logs_seconds = {restore}"))
        .await?;
    outcome
}
