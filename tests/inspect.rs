//! `ecst inspect-binlog` over binlogs recorded from real MySQL 5.6–9.6 and MariaDB 10.5 servers
//! (`tests/fixtures/mysql-binlogs/`, provenance in its README): every change the source's own
//! decoder gives, with the values the files hold written out, and the definite refusals. No
//! server is needed: these run everywhere, and are the only MySQL 8/9 binlog proof on machines
//! without Docker.

use std::path::PathBuf;

use ecst::inspect::{InspectError, Options, inspect_file};
use ecst::source::SourceError;
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mysql-binlogs")
        .join(name)
}

/// The lines printed for `name`, and the error that ended the file, if any.
async fn inspect(name: &str, opts: Options) -> (Vec<Value>, Option<InspectError>) {
    let mut out = Vec::new();
    let result = inspect_file(&fixture(name), opts, &mut out).await;
    printed(out, result)
}

/// The JSON lines of `out`, and the error of `result`.
fn printed<T>(out: Vec<u8>, result: Result<T, InspectError>) -> (Vec<Value>, Option<InspectError>) {
    let lines = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, result.err())
}

fn changes(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l.get("op").is_some()).collect()
}

fn commits(lines: &[Value]) -> Vec<(String, u64, Option<String>)> {
    lines
        .iter()
        .filter_map(|l| l.get("commit"))
        .map(|c| {
            (
                c["file"].as_str().unwrap().to_string(),
                c["pos"].as_u64().unwrap(),
                c["gtid"].as_str().map(str::to_string),
            )
        })
        .collect()
}

const POSITIONAL: Options = Options {
    commits: true,
    positional: true,
};
const STRICT: Options = Options {
    commits: true,
    positional: false,
};

#[tokio::test]
async fn a_compressed_transaction_is_decoded_and_its_boundary_is_the_payload_events_end() {
    // MySQL 8.0.32, binlog_transaction_compression = ON: one TRANSACTION_PAYLOAD (zstd) holding
    // BEGIN, TABLE_MAP, WRITE_ROWS, XID. Recorded with MINIMAL metadata, hence positional names.
    let (lines, err) = inspect("transaction_compression.000001", POSITIONAL).await;
    assert!(err.is_none(), "{err:?}");
    let ch = changes(&lines);
    assert_eq!(ch.len(), 1, "{lines:?}");
    assert_eq!(ch[0]["op"], "c");
    assert_eq!(ch[0]["table"], "test.tb1");
    assert_eq!(ch[0]["after"], json!({"@1": 1}));
    // Placed at the end of the anonymous GTID event before the payload…
    assert_eq!(ch[0]["position"]["pos"], 274);
    // …and committed at the payload's end (431), never inside it; then the rotate.
    assert_eq!(
        commits(&lines),
        vec![
            ("transaction_compression.000001".into(), 431, None),
            ("binlog.000043".into(), 4, None)
        ]
    );
}

#[tokio::test]
async fn a_tagged_gtid_of_mysql_9_is_carried_as_uuid_tag_gno() {
    let (lines, err) = inspect("binlog_transaction_with_GTID_TAG.000001", POSITIONAL).await;
    assert!(err.is_none(), "{err:?}");
    let ch = changes(&lines);
    assert_eq!(ch.len(), 1);
    let gtid = "55778904-0299-11f1-b1b8-4ef0c4956feb:mytag:3";
    assert_eq!(ch[0]["gtid"], gtid);
    assert_eq!(ch[0]["table"], "test.orders");
    assert_eq!(ch[0]["after"], json!({"@1": 3, "@2": 100, "@3": "250.00"}));
    assert_eq!(
        commits(&lines)[0],
        (
            "binlog_transaction_with_GTID_TAG.000001".into(),
            541,
            Some(gtid.into())
        )
    );
}

#[tokio::test]
async fn a_time_below_minus_255_hours_keeps_its_hours() {
    let (lines, err) = inspect("time_issue.000001", POSITIONAL).await;
    assert!(err.is_none(), "{err:?}");
    let ch = changes(&lines);
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0]["after"], json!({"@1": "-507:48:27"}));
}

#[tokio::test]
async fn bit_values_are_their_bytes() {
    let (lines, err) = inspect("mysql_type_bit.000001", STRICT).await;
    assert!(err.is_none(), "{err:?}");
    let ch = changes(&lines);
    assert_eq!(ch.len(), 1);
    // BIT(3) b'100', TEXT 'foo', BIT(8) b'00100000'.
    assert_eq!(
        ch[0]["after"],
        json!({"a": "0x04", "b": "foo", "c": "0x20"})
    );
    assert_eq!(
        ch[0]["gtid"], "fbda2ad0-7c46-11ec-ae30-4ef7efc81a2a:3",
        "a classic MySQL GTID"
    );
    assert_eq!(ch[0]["position"]["pos"], 781);
}

#[tokio::test]
async fn enum_and_set_values_are_their_labels_in_inserts_updates_and_deletes() {
    let (lines, err) = inspect("mysql-enum-string-set.000001", STRICT).await;
    assert!(err.is_none(), "{err:?}");
    let ch = changes(&lines);
    let ops: Vec<&str> = ch.iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["c", "u", "d"]);
    let digits = |n: usize| -> String { "0123456789".chars().cycle().take(n).collect() };
    let inserted = &ch[0]["after"];
    assert_eq!(
        inserted["f1"],
        digits(100),
        "CHAR(128) in utf8mb4_0900_ai_ci"
    );
    assert_eq!(inserted["f3"], "var1");
    assert_eq!(inserted["f4"], "one,three");
    assert_eq!(inserted["f5"], "0123456789");
    assert_eq!(ch[1]["before"], *inserted);
    let updated = &ch[1]["after"];
    assert_eq!(updated["f1"], "field1");
    assert_eq!(updated["f2"], "field_2");
    assert_eq!(updated["f3"], "variant2");
    assert_eq!(updated["f4"], "two,four");
    assert_eq!(ch[2]["before"], *updated);
    assert_eq!(ch[2]["after"], Value::Null);
}

#[tokio::test]
async fn invisible_columns_are_captured_like_visible_ones() {
    // f1, f2 and f6 are INVISIBLE; the binlog carries them, and so does every change.
    let (lines, err) = inspect("binlog-invisible-columns.000001", STRICT).await;
    assert!(err.is_none(), "{err:?}");
    let ch = changes(&lines);
    assert_eq!(ch.len(), 3);
    assert_eq!(
        ch[0]["after"],
        json!({"f1": 1, "f2": 2, "f3": -3, "f4": "4", "f5": "0x05", "f6": "6000000000"})
    );
    assert_eq!(ch[0]["key"], Value::Null, "the table has no primary key");
    assert_eq!(
        ch[2]["after"],
        json!({"f1": 111, "f2": 222, "f3": -333, "f4": "444", "f5": "0x55", "f6": null})
    );
    assert_eq!(
        commits(&lines).last().unwrap().2.as_deref(),
        Some("97c7af02-4c50-11ec-acd8-681842034964:5")
    );
}

#[tokio::test]
async fn a_mariadb_binlog_gives_its_gtids_and_keys() {
    let (lines, err) = inspect("mariadb-bin.000001", STRICT).await;
    assert!(err.is_none(), "{err:?}");
    let ch = changes(&lines);
    assert_eq!(ch.len(), 2);
    assert_eq!(ch[0]["table"], "toddy_test.outbox");
    assert_eq!(ch[0]["key"], json!({"id": 62}));
    assert_eq!(ch[0]["gtid"], "0-1-1");
    assert_eq!(ch[0]["after"]["event_type"], "JSON");
    assert_eq!(ch[0]["after"]["created"], "2022-04-20T22:18:04Z");
    // `event` is a BLOB there (charset 63 in the TABLE_MAP): its bytes, '{"foo":1}'.
    assert_eq!(ch[0]["after"]["event"], "0x7b22666f6f223a317d");
    assert_eq!(ch[1]["gtid"], "0-1-2");
    assert_eq!(
        commits(&lines),
        vec![
            ("mariadb-bin.000001".into(), 702, Some("0-1-1".into())),
            ("mariadb-bin.000001".into(), 1074, Some("0-1-2".into()))
        ]
    );
}

#[tokio::test]
async fn binary_json_is_rendered_as_json_text_and_a_partial_json_update_with_a_minimal_image_is_refused()
 {
    // MySQL 8.0.22: JSON column with generated columns; UPDATE_ROWS, then a PARTIAL_UPDATE_ROWS
    // written with binlog_row_value_options = PARTIAL_JSON and a MINIMAL before image (only the
    // key): the before value the diff applies to is not in the binlog, so it is refused.
    let (lines, err) = inspect("json.binlog.000001", POSITIONAL).await;
    let ch = changes(&lines);
    assert_eq!(
        ch.len(),
        12,
        "6 inserts and 6 full updates before the refusal"
    );
    assert_eq!(
        ch[0]["after"],
        json!({"@1": 1, "@2": "{\"age\":24,\"data\":\"xxxxxxxxxx\",\"name\":\"Joe\"}", "@3": "Joe", "@4": 24})
    );
    assert_eq!(
        ch[6]["after"]["@2"],
        "{\"age\":25,\"data\":\"xxxxxxxxxx\",\"name\":\"Joe\"}"
    );
    match err {
        Some(InspectError::Refused {
            source: SourceError::PartialJson { table, .. },
            ..
        }) => assert_eq!(table, "mysql.t"),
        other => panic!("expected the partial JSON refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn minimal_row_metadata_is_refused_naming_the_setting() {
    let (lines, err) = inspect("minimal_row_metadata.000001", STRICT).await;
    assert!(changes(&lines).is_empty());
    match err {
        Some(InspectError::Refused {
            source: SourceError::MissingRowMetadata { table },
            ..
        }) => assert_eq!(table, "noria.t1"),
        other => panic!("expected the metadata refusal, got {other:?}"),
    }
    // Decoded positionally, the same row is refused for its partial image (columns 2 and 4).
    let (lines, err) = inspect("minimal_row_metadata.000001", POSITIONAL).await;
    assert!(changes(&lines).is_empty());
    match err {
        Some(InspectError::Refused {
            source: SourceError::PartialRowImage { missing, image, .. },
            ..
        }) => {
            assert_eq!(missing, ["@2", "@4"]);
            assert_eq!(image, "after");
        }
        other => panic!("expected the partial-image refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn statement_format_dml_of_mysql_5_6_is_refused_not_skipped() {
    let (lines, err) = inspect("binlog_transaction_with_GTID.000001", STRICT).await;
    assert!(changes(&lines).is_empty());
    assert_eq!(
        commits(&lines),
        vec![(
            "binlog_transaction_with_GTID.000001".into(),
            297,
            Some("006c2cf2-b1ea-11e4-9057-8c705a3d3e78:1".into())
        )],
        "the CREATE TABLE before it is a boundary"
    );
    match err {
        Some(InspectError::Refused {
            source: SourceError::StatementDml { table, .. },
            ..
        }) => assert_eq!(table, "test.t1"),
        other => panic!("expected the statement-DML refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_file_with_only_previous_gtids_and_a_rotate_gives_one_boundary() {
    let (lines, err) = inspect("binlog_transaction_previous_GTID_no_tag.000001", STRICT).await;
    assert!(err.is_none(), "{err:?}");
    assert!(changes(&lines).is_empty());
    assert_eq!(commits(&lines), vec![("binlog.000008".into(), 4, None)]);
}

/// The lines printed for `names` read in turn (the binlog before each file is the ones before
/// it), and the error that ended them, if any.
async fn inspect_files(names: &[&str]) -> (Vec<Value>, Option<InspectError>) {
    let paths: Vec<PathBuf> = names.iter().map(|n| fixture(n)).collect();
    let mut out = Vec::new();
    let result = ecst::inspect::inspect(&paths, STRICT, &mut out).await;
    printed(out, result)
}

#[tokio::test]
async fn xa_transactions_are_published_at_their_commit_even_in_a_later_file_and_rolled_back_ones_never()
 {
    // Recorded on MariaDB 10.11: x1 prepared, a plain insert (id 10), x1 committed; x2 prepared
    // and rolled back; x3 committed in one phase; x4 prepared, the binlog rotated, x4 committed
    // in the next file, then a plain insert (id 11).
    let (lines, err) = inspect_files(&["mariadb-xa.000001", "mariadb-xa.000002"]).await;
    assert!(err.is_none(), "{err:?}");
    let got: Vec<(String, i64, Option<&str>, &str, u64)> = changes(&lines)
        .iter()
        .map(|c| {
            (
                c["op"].as_str().unwrap().to_string(),
                c["key"]["id"].as_i64().unwrap(),
                c["after"]["v"].as_str(),
                c["position"]["file"].as_str().unwrap(),
                c["position"]["pos"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("c".into(), 10, Some("plain"), "mariadb-xa.000001", 782),
            // x1's row is placed at its XA COMMIT (GTID 0-1-152879), after the plain insert.
            ("c".into(), 1, Some("prepared"), "mariadb-xa.000001", 1026),
            ("c".into(), 3, Some("one phase"), "mariadb-xa.000001", 1663),
            // x4, prepared in the first file, found there from its commit in the second.
            ("u".into(), 1, Some("next file"), "mariadb-xa.000002", 433),
            ("c".into(), 11, Some("after"), "mariadb-xa.000002", 571),
        ]
    );
    let gtids: Vec<&str> = changes(&lines)
        .iter()
        .map(|c| c["gtid"].as_str().unwrap())
        .collect();
    assert_eq!(
        gtids,
        [
            "0-1-152878",
            "0-1-152879",
            "0-1-152882",
            "0-1-152884",
            "0-1-152885"
        ],
        "each change carries the GTID of the group that committed it"
    );
    // Every group is a boundary, the prepared and rolled-back ones included (they publish
    // nothing): nine groups and the rotate to the next file.
    assert_eq!(commits(&lines).len(), 10, "{lines:?}");
}

#[tokio::test]
async fn an_xa_commit_whose_prepare_is_in_no_file_given_is_a_definite_refusal_not_a_skip() {
    let (lines, err) = inspect_files(&["mariadb-xa.000002"]).await;
    assert!(changes(&lines).is_empty(), "{lines:?}");
    let err = err.expect("refused").to_string();
    assert!(
        err.contains("XA COMMIT of X'7834',X'',1") && err.contains("re-snapshot"),
        "{err}"
    );
}

#[tokio::test]
async fn every_fixture_is_covered_by_a_test() {
    // A new recording must get its own expectations above, not pass unseen.
    let covered = [
        "transaction_compression.000001",
        "binlog_transaction_with_GTID_TAG.000001",
        "time_issue.000001",
        "mysql_type_bit.000001",
        "mysql-enum-string-set.000001",
        "binlog-invisible-columns.000001",
        "mariadb-bin.000001",
        "json.binlog.000001",
        "minimal_row_metadata.000001",
        "binlog_transaction_with_GTID.000001",
        "binlog_transaction_previous_GTID_no_tag.000001",
        "mariadb-xa.000001",
        "mariadb-xa.000002",
    ];
    let mut present: Vec<String> = std::fs::read_dir(fixture(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "README.md")
        .collect();
    present.sort();
    let mut expected: Vec<String> = covered.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(present, expected);
}

#[test]
fn a_truncated_file_is_an_error_naming_the_offset_not_a_panic() {
    let bytes = std::fs::read(fixture("mysql_type_bit.000001")).unwrap();
    let dir = std::env::temp_dir().join(format!("ecst-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cut = dir.join("cut.000001");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ecst"))
        .arg("inspect-binlog")
        .arg(&cut)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("event at offset"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // What came before the cut was printed.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "the row decoded before the cut (inside the transaction's XID)"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_row_event_with_a_flipped_byte_fails_its_crc32_check_naming_its_position() {
    let mut bytes = std::fs::read(fixture("mysql_type_bit.000001")).unwrap();
    // The first WRITE_ROWS event (type 30): walk the v4 headers (type at +4, size at +9).
    let mut pos = 4;
    let (start, size) = loop {
        let size = u32::from_le_bytes(bytes[pos + 9..pos + 13].try_into().unwrap()) as usize;
        if bytes[pos + 4] == 30 {
            break (pos, size);
        }
        pos += size;
    };
    bytes[start + 19 + 4] ^= 0xff; // inside the body, before the 4-byte checksum
    let dir = std::env::temp_dir().join(format!("ecst-inspect-crc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("flipped.000001");
    std::fs::write(&bad, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ecst"))
        .arg("inspect-binlog")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("flipped.000001:{}", start + size)) && stderr.contains("CRC32"),
        "the error names the event's end position and the check: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("\"op\":\"c\""),
        "nothing of the corrupt event is printed: {stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
