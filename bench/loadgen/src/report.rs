//! `loadgen report RESULTS.jsonl [--json OUT.json] [--note TEXT]`: one markdown table of
//! medians over the repetitions, with min–max, and wsgate/nginx, wsgate/haproxy ratios
//! computed per repetition (the runs of one repetition were interleaved, so they saw the same
//! machine drift) and then summarised the same way. A column (and its ratios) appears when the
//! records have that target: `floor` and `floor-actors` (bench/compare.sh `--targets "...
//! floor floor-actors ..."`) only when asked for.

use serde_json::{json, Value};
use std::collections::BTreeMap;

const TARGETS: [&str; 7] = [
    "direct",
    "wsgate-message",
    "wsgate-tunnel",
    "floor",
    "floor-actors",
    "nginx",
    "haproxy",
];
const RATIOS: [(&str, &str); 9] = [
    ("wsgate-message", "nginx"),
    ("wsgate-message", "haproxy"),
    ("wsgate-tunnel", "nginx"),
    ("wsgate-tunnel", "haproxy"),
    ("floor", "nginx"),
    ("floor", "haproxy"),
    ("floor-actors", "nginx"),
    ("floor-actors", "haproxy"),
    ("wsgate-message", "floor-actors"),
];

fn get(v: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_f64()
}

struct Row {
    label: String,
    test: &'static str,
    size: Option<u64>,
    path: &'static str,
    /// Subtract direct's value of the same repetition (added latency).
    minus_direct: bool,
    scale: f64,
}

fn rows(sizes: &[u64], open_rate: Option<f64>) -> Vec<Row> {
    let mut r = Vec::new();
    let row = |label: String, test, size, path, minus_direct, scale| Row {
        label,
        test,
        size,
        path,
        minus_direct,
        scale,
    };
    for &s in sizes {
        let n = if s >= 1024 && s % 1024 == 0 {
            format!("{} KiB", s / 1024)
        } else {
            format!("{s} B")
        };
        let t = "closed";
        r.push(row(
            format!("closed {n}: msgs/s"),
            t,
            Some(s),
            "rate",
            false,
            1.0,
        ));
        r.push(row(
            format!("closed {n}: p50 µs"),
            t,
            Some(s),
            "latency.p50_us",
            false,
            1.0,
        ));
        r.push(row(
            format!("closed {n}: p99 µs"),
            t,
            Some(s),
            "latency.p99_us",
            false,
            1.0,
        ));
        r.push(row(
            format!("closed {n}: msgs per proxy CPU-s"),
            t,
            Some(s),
            "msgs_per_cpu_s",
            false,
            1.0,
        ));
    }
    let o = open_rate.map_or("open".to_string(), |x| format!("open {x:.0}/s"));
    for (q, p) in [
        ("p50", "latency.p50_us"),
        ("p90", "latency.p90_us"),
        ("p99", "latency.p99_us"),
        ("max", "latency.max_us"),
    ] {
        r.push(row(
            format!("{o}: added {q} µs"),
            "open",
            None,
            p,
            true,
            1.0,
        ));
    }
    r.push(row(
        "idle: proxy RSS KiB/session".into(),
        "idle",
        None,
        "rss_bytes_per_session",
        false,
        1.0 / 1024.0,
    ));
    r.push(row(
        "handshake: sessions/s".into(),
        "handshake",
        None,
        "rate",
        false,
        1.0,
    ));
    r.push(row(
        "handshake: p50 µs".into(),
        "handshake",
        None,
        "latency.p50_us",
        false,
        1.0,
    ));
    r.push(row(
        "handshake: sessions per proxy CPU-s".into(),
        "handshake",
        None,
        "sessions_per_cpu_s",
        false,
        1.0,
    ));
    r.push(row(
        "other processes' CPU during the runs (cores, mean)".into(),
        "*",
        None,
        "foreign_cores",
        false,
        1.0,
    ));
    r
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        "–".into()
    } else if a >= 100_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if a >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// "median (min–max)" over the repetitions, or just the value for one.
fn cell(vals: &[f64]) -> (String, Value) {
    if vals.is_empty() {
        return ("n/a".into(), Value::Null);
    }
    let mut v = vals.to_vec();
    let m = median(&mut v);
    let (lo, hi) = (v[0], v[v.len() - 1]);
    let s = if v.len() == 1 {
        fmt(m)
    } else {
        format!("{} ({}–{})", fmt(m), fmt(lo), fmt(hi))
    };
    (s, json!({"median": m, "min": lo, "max": hi, "n": v.len()}))
}

pub fn main(args: Vec<String>) -> i32 {
    let Some(path) = args.first() else {
        eprintln!("usage: loadgen report RESULTS.jsonl [--json OUT.json] [--note TEXT]");
        return 2;
    };
    let opts = wsgate_loadgen::Args::parse(args[1..].iter().cloned());
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("report: {path}: {e}");
            return 1;
        }
    };
    let recs: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let present: Vec<&str> = TARGETS
        .into_iter()
        .filter(|t| recs.iter().any(|r| r["target"] == *t))
        .collect();
    let ratios: Vec<(&str, &str)> = RATIOS
        .into_iter()
        .filter(|(a, b)| present.contains(a) && present.contains(b))
        .collect();
    let mut sizes: Vec<u64> = recs
        .iter()
        .filter(|r| r["test"] == "closed")
        .filter_map(|r| r["size"].as_u64())
        .collect();
    sizes.sort();
    sizes.dedup();
    let open_rate = recs
        .iter()
        .find(|r| r["test"] == "open")
        .and_then(|r| r["rate_target"].as_f64());
    let reps = recs
        .iter()
        .filter_map(|r| r["rep"].as_u64())
        .max()
        .unwrap_or(0);

    // (row, target) -> rep -> value
    let rows = rows(&sizes, open_rate);
    let mut vals: Vec<BTreeMap<&str, BTreeMap<u64, f64>>> = Vec::new();
    for row in &rows {
        let mut per: BTreeMap<&str, BTreeMap<u64, f64>> = BTreeMap::new();
        let mut counts: BTreeMap<(&str, u64), f64> = BTreeMap::new();
        for r in recs.iter().filter(|r| {
            (row.test == "*" || r["test"] == row.test)
                && row.size.is_none_or(|s| r["size"].as_u64() == Some(s))
        }) {
            let (Some(t), Some(rep)) = (r["target"].as_str(), r["rep"].as_u64()) else {
                continue;
            };
            let Some(t) = TARGETS.iter().find(|x| **x == t) else {
                continue;
            };
            if let Some(x) = get(r, row.path) {
                if row.test == "*" {
                    // Several records per repetition: their mean (summed here, divided below).
                    *per.entry(t).or_default().entry(rep).or_insert(0.0) += x;
                    *counts.entry((t, rep)).or_insert(0.0) += 1.0;
                } else {
                    per.entry(t).or_default().insert(rep, x * row.scale);
                }
            }
        }
        for (t, m) in per.iter_mut() {
            for (rep, x) in m.iter_mut() {
                if let Some(n) = counts.get(&(*t, *rep)) {
                    *x /= n;
                }
            }
        }
        if row.minus_direct {
            let direct = per.get("direct").cloned().unwrap_or_default();
            for (t, m) in per.iter_mut() {
                if *t == "direct" {
                    continue;
                }
                m.retain(|rep, _| direct.contains_key(rep));
                for (rep, x) in m.iter_mut() {
                    *x -= direct[rep];
                }
            }
        }
        vals.push(per);
    }

    let mut out = String::new();
    let mut head = String::from("| figure |");
    let mut sep = String::from("|---|");
    for &t in &present {
        head += &format!(" {t} |");
        sep += "---:|";
    }
    for &(a, b) in &ratios {
        let a = a.replace("wsgate-", "");
        head += &format!(" {a}/{b} |");
        sep += "---:|";
    }
    out += &head;
    out.push('\n');
    out += &sep;
    out.push('\n');
    let mut summary = Vec::new();
    for (row, per) in rows.iter().zip(&vals) {
        let mut line = format!("| {} |", row.label);
        let mut js = json!({"figure": row.label});
        for &t in &present {
            let v: Vec<f64> = per
                .get(t)
                .map(|m| m.values().copied().collect())
                .unwrap_or_default();
            let (s, j) = cell(&v);
            line += &format!(" {s} |");
            js[t] = j;
        }
        for &(a, b) in &ratios {
            if row.test == "*" {
                line += " |";
                continue;
            }
            let (Some(ma), Some(mb)) = (per.get(a), per.get(b)) else {
                line += " n/a |";
                continue;
            };
            let v: Vec<f64> = ma
                .iter()
                .filter_map(|(rep, x)| mb.get(rep).map(|y| x / y))
                .filter(|r| r.is_finite() && *r > 0.0)
                .collect();
            let (s, j) = cell(&v);
            line += &format!(" {s} |");
            js[format!("{a}/{b}")] = j;
        }
        out += &line;
        out.push('\n');
        summary.push(js);
    }
    // Faults, summed over every record of each target.
    let mut line = String::from("| failures: connect/errors/lost/mismatch (all runs) |");
    let mut fj = json!({});
    for &t in &present {
        let mut f = [0u64; 4];
        for r in recs.iter().filter(|r| r["target"] == t) {
            for (i, k) in ["connect_fail", "errors", "lost", "mismatch"]
                .iter()
                .enumerate()
            {
                f[i] += r["faults"][k].as_u64().unwrap_or(0);
            }
        }
        line += &format!(" {}/{}/{}/{} |", f[0], f[1], f[2], f[3]);
        fj[t] = json!(f);
    }
    for _ in &ratios {
        line += " |";
    }
    out += &line;
    out.push('\n');
    if let Some(note) = opts.opt("note") {
        out += &format!("\n{note}\n");
    }
    out += &format!(
        "\nMedians of {reps} interleaved repetition(s), (min–max) across them; ratios are computed per repetition. \
         Open-loop rows: added latency = proxy − direct of the same repetition (the direct column is direct's absolute latency).\n"
    );
    print!("{out}");
    if let Some(j) = opts.opt("json") {
        let doc = json!({
            "note": opts.opt("note"),
            "repetitions": reps,
            "table_markdown": out,
            "summary": summary,
            "failures": fj,
            "runs": recs,
        });
        if let Err(e) = std::fs::write(&j, serde_json::to_string_pretty(&doc).unwrap_or_default()) {
            eprintln!("report: {j}: {e}");
            return 1;
        }
    }
    0
}
