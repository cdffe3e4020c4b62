//! GTID states: what a source position covers, in the form each server understands, so that a
//! position can be found again on *another* server (a promoted replica) where its file and byte
//! offset mean nothing.
//!
//! * MariaDB: a GTID position, the last GTID of each replication domain (`0-1-42,5-3-7`), as
//!   `@@gtid_binlog_pos` prints it and `@slave_connect_state` takes it. Adding a transaction's
//!   GTID replaces its domain's entry: within a domain the binlog order is the commit order.
//! * MySQL: a GTID set, intervals of transaction numbers per source UUID and tag
//!   (`uuid:1-57:60,uuid2:tag:1-3`), as `@@gtid_executed` prints it. Adding a GTID adds its number
//!   to its interval list, merging neighbours.
//!
//! The state is carried with every stored position (`offsets::SourceOffset::gtid_set`), so it
//! is exactly the set of transactions before that position: the decoder adds each transaction's
//! GTID as the transaction's boundary is emitted, never before.

use std::collections::BTreeMap;
use std::fmt;

/// A GTID state that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable GTID {what}: `{text}`")]
pub struct GtidError {
    what: &'static str,
    text: String,
}

fn bad(what: &'static str, text: &str) -> GtidError {
    GtidError {
        what,
        text: text.to_string(),
    }
}

/// What a position covers (see the module note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GtidState {
    /// MariaDB: domain → (server id, sequence number) of its last transaction.
    MariaDb(BTreeMap<u32, (u32, u64)>),
    /// MySQL: (source UUID, tag) → sorted, disjoint, non-adjacent inclusive intervals.
    MySql(BTreeMap<(String, String), Vec<(u64, u64)>>),
}

impl GtidState {
    /// A MariaDB GTID position (`d-s-n[,d-s-n…]`; empty: nothing yet).
    pub fn parse_mariadb(text: &str) -> Result<Self, GtidError> {
        let mut m = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (d, s, n) = parse_mariadb_gtid(part).ok_or_else(|| bad("position", text))?;
            m.insert(d, (s, n));
        }
        Ok(GtidState::MariaDb(m))
    }

    /// A MySQL GTID set (`uuid:1-5:7[:tag:1-3],uuid2:…`; empty: nothing yet).
    pub fn parse_mysql(text: &str) -> Result<Self, GtidError> {
        let mut m: BTreeMap<(String, String), Vec<(u64, u64)>> = BTreeMap::new();
        for group in text.split(',').map(|g| g.trim()).filter(|g| !g.is_empty()) {
            let mut items = group.split(':');
            let uuid = items
                .next()
                .filter(|u| u.len() == 36)
                .ok_or_else(|| bad("set", text))?
                .to_ascii_lowercase();
            let mut tag = String::new();
            for item in items {
                let item = item.trim();
                if item.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                    tag = item.to_ascii_lowercase();
                    continue;
                }
                let (a, b) = match item.split_once('-') {
                    Some((a, b)) => (a.parse(), b.parse()),
                    None => (item.parse(), item.parse()),
                };
                let (Ok(a), Ok(b)) = (a, b) else {
                    return Err(bad("set", text));
                };
                if a == 0 || b < a {
                    return Err(bad("set", text));
                }
                insert_range(m.entry((uuid.clone(), tag.clone())).or_default(), a, b);
            }
        }
        Ok(GtidState::MySql(m))
    }

    /// Parses a stored state: a MySQL set has UUIDs (`:`), a MariaDB position does not.
    pub fn parse(text: &str) -> Result<Self, GtidError> {
        if text.contains(':') {
            Self::parse_mysql(text)
        } else {
            Self::parse_mariadb(text)
        }
    }

    /// Adds one transaction's GTID (`d-s-n` on MariaDB, `uuid[:tag]:n` on MySQL).
    pub fn add(&mut self, gtid: &str) -> Result<(), GtidError> {
        match self {
            GtidState::MariaDb(m) => {
                let (d, s, n) = parse_mariadb_gtid(gtid).ok_or_else(|| bad("", gtid))?;
                m.insert(d, (s, n));
            }
            GtidState::MySql(m) => {
                let mut parts = gtid.rsplitn(2, ':');
                let n: u64 = parts
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| bad("", gtid))?;
                let head = parts.next().ok_or_else(|| bad("", gtid))?;
                let (uuid, tag) = head.split_once(':').unwrap_or((head, ""));
                let list = m
                    .entry((uuid.to_ascii_lowercase(), tag.to_ascii_lowercase()))
                    .or_default();
                insert(list, n);
            }
        }
        Ok(())
    }

    /// MariaDB: whether this position is at or behind `server`'s `@@gtid_binlog_pos` in every
    /// domain it names (a server that lacks a domain, or is behind in one, has not seen all of
    /// it). MySQL: whether every transaction of this set is in `server`'s set.
    pub fn contained_in(&self, server: &GtidState) -> bool {
        match (self, server) {
            (GtidState::MariaDb(ours), GtidState::MariaDb(theirs)) => ours
                .iter()
                .all(|(d, (_, n))| theirs.get(d).is_some_and(|(_, m)| m >= n)),
            (GtidState::MySql(ours), GtidState::MySql(theirs)) => ours.iter().all(|(k, list)| {
                let Some(other) = theirs.get(k) else {
                    return list.is_empty();
                };
                list.iter()
                    .all(|(a, b)| other.iter().any(|(c, d)| c <= a && b <= d))
            }),
            _ => false,
        }
    }
}

impl fmt::Display for GtidState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GtidState::MariaDb(m) => {
                let parts: Vec<String> =
                    m.iter().map(|(d, (s, n))| format!("{d}-{s}-{n}")).collect();
                f.write_str(&parts.join(","))
            }
            GtidState::MySql(m) => {
                let mut groups: Vec<String> = Vec::new();
                let mut current: Option<&str> = None;
                for ((uuid, tag), list) in m {
                    if list.is_empty() {
                        continue;
                    }
                    let intervals: Vec<String> = list
                        .iter()
                        .map(|(a, b)| {
                            if a == b {
                                a.to_string()
                            } else {
                                format!("{a}-{b}")
                            }
                        })
                        .collect();
                    let tagged = if tag.is_empty() {
                        intervals.join(":")
                    } else {
                        format!("{tag}:{}", intervals.join(":"))
                    };
                    if current == Some(uuid.as_str())
                        && let Some(last) = groups.last_mut()
                    {
                        last.push(':');
                        last.push_str(&tagged);
                    } else {
                        groups.push(format!("{uuid}:{tagged}"));
                        current = Some(uuid.as_str());
                    }
                }
                f.write_str(&groups.join(","))
            }
        }
    }
}

/// `d-s-n` → (domain, server, sequence).
fn parse_mariadb_gtid(s: &str) -> Option<(u32, u32, u64)> {
    let mut it = s.trim().splitn(3, '-');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

/// Adds `n` to a sorted list of disjoint intervals, merging neighbours.
fn insert(list: &mut Vec<(u64, u64)>, n: u64) {
    insert_range(list, n, n);
}

/// Adds `[a, b]`, merging every interval it overlaps or touches.
fn insert_range(list: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    let mut lo = a;
    let mut hi = b;
    let mut out = Vec::with_capacity(list.len() + 1);
    let mut placed = false;
    for &(c, d) in list.iter() {
        if d.saturating_add(1) < lo {
            out.push((c, d));
        } else if hi.saturating_add(1) < c {
            if !placed {
                out.push((lo, hi));
                placed = true;
            }
            out.push((c, d));
        } else {
            lo = lo.min(c);
            hi = hi.max(d);
        }
    }
    if !placed {
        out.push((lo, hi));
    }
    out.sort_unstable();
    *list = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mariadb_position_keeps_the_last_gtid_of_each_domain() {
        let mut s = GtidState::parse_mariadb("0-1-41,5-3-7").unwrap();
        s.add("0-1-42").unwrap();
        s.add("7-2-1").unwrap();
        assert_eq!(s.to_string(), "0-1-42,5-3-7,7-2-1");
        let server = GtidState::parse_mariadb("0-3-50,5-3-7,7-2-1").unwrap();
        assert!(s.contained_in(&server));
        let behind = GtidState::parse_mariadb("0-1-40,5-3-7,7-2-1").unwrap();
        assert!(!s.contained_in(&behind), "a lagging replica");
        let missing = GtidState::parse_mariadb("0-1-42").unwrap();
        assert!(!s.contained_in(&missing), "a domain it never saw");
        assert_eq!(GtidState::parse_mariadb("").unwrap().to_string(), "");
        assert!(GtidState::parse_mariadb("0-1").is_err());
    }

    #[test]
    fn a_mysql_set_merges_intervals_and_keeps_tags_apart() {
        let u = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let mut s = GtidState::parse_mysql(&format!("{u}:1-5:7")).unwrap();
        s.add(&format!("{u}:6")).unwrap();
        s.add(&format!("{u}:9")).unwrap();
        s.add(&format!("{u}:mytag:3")).unwrap();
        assert_eq!(s.to_string(), format!("{u}:1-7:9:mytag:3"));
        let parsed = GtidState::parse(&s.to_string()).unwrap();
        assert_eq!(parsed, s, "the printed form reads back");
        let server = GtidState::parse_mysql(&format!("{u}:1-20:mytag:1-5")).unwrap();
        assert!(s.contained_in(&server));
        let short = GtidState::parse_mysql(&format!("{u}:1-8")).unwrap();
        assert!(!s.contained_in(&short));
        assert!(GtidState::parse_mysql("nope:1-2").is_err());
        assert!(GtidState::parse_mysql(&format!("{u}:5-2")).is_err());
    }
}
