//! The results table in docs/benchmarks.md, rebuilt from the JSON records.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

pub const START_MARKER: &str = "<!-- results:start -->";
pub const END_MARKER: &str = "<!-- results:end -->";

const HEADER: &str = "\
| run | database | date | events × fan-out | deliveries/s | ceiling requests/s | first attempt p50 / p99 / max (ms) | producer p50 / p99 (ms) | peak RSS (MiB) | duplicates | notes |
|---|---|---|---|---|---|---|---|---|---|---|";

/// Columns of [`HEADER`]. Rows with another count are dropped as outdated.
const COLUMNS: usize = 11;

/// Rewrites the table between the markers of `path`, replacing the rows of
/// the same run and database as a record and keeping all other rows.
pub fn update_docs(path: &Path, records: &[Value]) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let updated = replace_rows(&text, records)
        .with_context(|| format!("updating the results table of {}", path.display()))?;
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

fn replace_rows(text: &str, records: &[Value]) -> anyhow::Result<String> {
    let Some(start) = text.find(START_MARKER) else {
        bail!("the marker {START_MARKER} is missing");
    };
    let block_start = start + START_MARKER.len();
    let Some(block_length) = text[block_start..].find(END_MARKER) else {
        bail!("the marker {END_MARKER} is missing after {START_MARKER}");
    };
    let block = &text[block_start..block_start + block_length];

    let mut rows: Vec<String> = block
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .skip(2)
        .filter(|line| line.starts_with('|') && cells(line).len() == COLUMNS)
        .map(str::to_owned)
        .collect();
    for record in records {
        let row = render_row(record);
        let key = row_key(&row);
        match rows.iter_mut().find(|existing| row_key(existing) == key) {
            Some(existing) => *existing = row,
            None => rows.push(row),
        }
    }

    let mut table = String::from("\n");
    table.push_str(HEADER);
    table.push('\n');
    for row in rows {
        table.push_str(&row);
        table.push('\n');
    }
    Ok(format!(
        "{}{table}{}",
        &text[..block_start],
        &text[block_start + block_length..]
    ))
}

fn cells(row: &str) -> Vec<&str> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

/// Returns the run label and the database, which identify a row.
fn row_key(row: &str) -> (String, String) {
    let cells = cells(row);
    (
        cells.first().copied().unwrap_or_default().to_owned(),
        cells.get(1).copied().unwrap_or_default().to_owned(),
    )
}

fn render_row(record: &Value) -> String {
    let first_attempt = match record.get("first_attempt_latency") {
        Some(latency) if latency.is_object() => format!(
            "{} / {} / {}",
            number(&latency["p50_ms"]),
            number(&latency["p99_ms"]),
            number(&latency["max_ms"])
        ),
        _ => "–".to_owned(),
    };
    let producer = match record.get("producer_latency") {
        Some(latency) if latency.is_object() => format!(
            "{} / {}",
            number(&latency["p50_ms"]),
            number(&latency["p99_ms"])
        ),
        _ => "–".to_owned(),
    };
    let cells = [
        text(&record["label"]),
        text(&record["database"]),
        text(&record["date"]),
        format!(
            "{} × {}",
            number(&record["events"]),
            number(&record["fanout"])
        ),
        number(&record["deliveries_per_s"]),
        number(&record["ceiling"]["requests_per_s"]),
        first_attempt,
        producer,
        number(&record["peak_rss_mib"]),
        number(&record["duplicates"]),
        notes(record).replace('|', "/"),
    ];
    format!("| {} |", cells.join(" | "))
}

/// Returns the record's notes followed by the CPU use of the machine just
/// before the run, which shows whether other work was running.
fn notes(record: &Value) -> String {
    let notes = record["notes"].as_str().unwrap_or_default();
    let busy = record["machine"]["cpu_busy_before_start_percent"].as_f64();
    match busy {
        Some(busy) if notes.is_empty() => format!("CPUs {busy} % busy before start"),
        Some(busy) => format!("{notes}; CPUs {busy} % busy before start"),
        None => notes.to_owned(),
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or("–").to_owned()
}

fn number(value: &Value) -> String {
    match value {
        Value::Number(number) => number.to_string(),
        _ => "–".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(label: &str, rate: f64) -> Value {
        json!({
            "label": label, "database": "sqlite", "date": "2026-01-01",
            "events": 10, "fanout": 2, "deliveries_per_s": rate,
            "ceiling": {"requests_per_s": 5000.0},
            "first_attempt_latency": {"p50_ms": 1.5, "p99_ms": 3.0, "max_ms": 4.0},
            "producer_latency": {"p50_ms": 0.5, "p99_ms": 0.9},
            "peak_rss_mib": 20.1, "duplicates": 0, "notes": "a | b",
            "machine": {"cpu_busy_before_start_percent": 12.5},
        })
    }

    const PAGE: &str = "intro\n<!-- results:start -->\nold text\n<!-- results:end -->\nafter\n";

    #[test]
    fn new_row_is_added_between_markers() {
        let updated = replace_rows(PAGE, &[record("fanout10", 100.0)]).unwrap();
        assert!(updated.starts_with("intro\n<!-- results:start -->\n| run |"));
        assert!(updated.contains("| fanout10 | sqlite | 2026-01-01 | 10 × 2 | 100.0 | 5000.0 | 1.5 / 3.0 / 4.0 | 0.5 / 0.9 | 20.1 | 0 | a / b; CPUs 12.5 % busy before start |"));
        assert!(updated.ends_with("<!-- results:end -->\nafter\n"));
        assert!(!updated.contains("old text"));
    }

    #[test]
    fn row_of_same_run_is_replaced() {
        let once =
            replace_rows(PAGE, &[record("fanout10", 100.0), record("fanout1", 7.0)]).unwrap();
        let twice = replace_rows(&once, &[record("fanout10", 200.0)]).unwrap();
        assert!(twice.contains("| 200.0 |"));
        assert!(!twice.contains("| 100.0 |"));
        assert!(twice.contains("| fanout1 |"));
        assert_eq!(twice.matches("| fanout10 |").count(), 1);
    }

    #[test]
    fn missing_marker_is_an_error() {
        let error = replace_rows("no markers", &[]).unwrap_err();
        assert!(error.to_string().contains(START_MARKER));
    }
}
