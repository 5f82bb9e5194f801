//! `status`: renders `GET /v1/cluster` as a human table.

use serde_json::Value;

/// Column titles of the per-region table, in order.
const COLUMNS: [&str; 9] = [
    "REGION",
    "URL",
    "STATUS",
    "LAG_MS",
    "PENDING",
    "HINTS",
    "CLOCK_MS",
    "NEEDS_AE",
    "LAST_ANTI_ENTROPY",
];

/// Renders the cluster document: a header line, then one row per region.
///
/// Missing or null fields show as `-` so a server that adds or omits a field still renders.
pub fn render_status(cluster: &Value) -> Result<String, String> {
    let Some(object) = cluster.as_object() else {
        return Err("GET /v1/cluster did not return a JSON object".to_owned());
    };
    let mut out = format!(
        "region: {}  cluster: {}",
        cell(object.get("region")),
        cell(object.get("cluster_id"))
    );
    if let Some(incarnation) = object.get("incarnation") {
        out.push_str(&format!("  incarnation: {}", cell(Some(incarnation))));
    }
    if let Some(Value::Bool(caught_up)) = object.get("caught_up") {
        out.push_str(&format!(
            "  caught up: {}",
            if *caught_up { "yes" } else { "no" }
        ));
    }
    out.push('\n');

    let regions = match object.get("regions") {
        Some(Value::Array(regions)) => regions.as_slice(),
        None | Some(Value::Null) => &[],
        Some(_) => return Err("`regions` in GET /v1/cluster is not an array".to_owned()),
    };
    let mut rows: Vec<[String; 9]> = vec![COLUMNS.map(str::to_owned)];
    for region in regions {
        let field = |name: &str| cell(region.get(name));
        rows.push([
            field("name"),
            field("url"),
            field("status"),
            field("replication_lag_ms"),
            field("pending_entries"),
            field("hints"),
            field("clock_offset_ms"),
            flag(region.get("needs_anti_entropy")),
            exchange(region.get("last_anti_entropy")),
        ]);
    }
    out.push_str(&format_table(&rows));
    if regions.is_empty() {
        out.push_str("(no regions listed)\n");
    }
    Ok(out)
}

/// The last anti-entropy exchange: when, and what it repaired (or that it stopped early).
fn exchange(value: Option<&Value>) -> String {
    let Some(Value::Object(report)) = value else {
        return cell(value);
    };
    let at = cell(report.get("at"));
    let repaired = cell(report.get("keys_repaired"));
    match report.get("complete") {
        Some(Value::Bool(false)) => format!("{at} incomplete"),
        _ => format!("{at} repaired {repaired}"),
    }
}

/// A yes/no cell (`-` when not said).
fn flag(value: Option<&Value>) -> String {
    match value {
        Some(Value::Bool(true)) => "yes".to_owned(),
        Some(Value::Bool(false)) => "no".to_owned(),
        other => cell(other),
    }
}

/// One table cell: strings unquoted, numbers and booleans as written, null/missing as `-`.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// Left-aligned columns separated by two spaces, with no trailing whitespace.
fn format_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, text) in widths.iter_mut().zip(row) {
            *width = (*width).max(text.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, text) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(text);
            } else {
                line.push_str(&format!("{text:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_a_sample_cluster() {
        let sample = json!({
            "region": "us-east",
            "cluster_id": "demo",
            "incarnation": "0190c8a4-7d0e-7cc1-9a53-0d3f1e9c2b11",
            "regions": [
                {"name": "us-east", "url": "http://127.0.0.1:7001", "status": "up",
                 "replication_lag_ms": 0, "pending_entries": 0, "hints": 0,
                 "clock_offset_ms": 0, "needs_anti_entropy": false,
                 "last_anti_entropy": "2025-01-01T00:00:00Z"},
                {"name": "eu-west", "url": "http://127.0.0.1:7002", "status": "down",
                 "replication_lag_ms": 1520, "pending_entries": 42, "hints": 7,
                 "clock_offset_ms": null, "needs_anti_entropy": true,
                 "last_anti_entropy": null},
                {"name": "ap-south", "url": "http://127.0.0.1:7003", "status": "up",
                 "replication_lag_ms": 1, "pending_entries": 0, "hints": 0,
                 "clock_offset_ms": -3, "needs_anti_entropy": false,
                 "last_anti_entropy": {"at": "2025-01-01T00:00:01Z", "complete": true,
                                       "keys_repaired": 3}}
            ],
            "applied": {"0190c8a4-7d0e-7cc1-9a53-0d3f1e9c2b11": 17},
            "caught_up": true
        });
        let expected = "\
region: us-east  cluster: demo  incarnation: 0190c8a4-7d0e-7cc1-9a53-0d3f1e9c2b11  caught up: yes
REGION    URL                    STATUS  LAG_MS  PENDING  HINTS  CLOCK_MS  NEEDS_AE  LAST_ANTI_ENTROPY
us-east   http://127.0.0.1:7001  up      0       0        0      0         no        2025-01-01T00:00:00Z
eu-west   http://127.0.0.1:7002  down    1520    42       7      -         yes       -
ap-south  http://127.0.0.1:7003  up      1       0        0      -3        no        2025-01-01T00:00:01Z repaired 3
";
        assert_eq!(render_status(&sample).expect("renders"), expected);
    }

    #[test]
    fn tolerates_missing_fields() {
        let sample = json!({"region": "r1", "regions": [{"name": "r1"}]});
        let text = render_status(&sample).expect("renders");
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "region: r1  cluster: -",
                "REGION  URL  STATUS  LAG_MS  PENDING  HINTS  CLOCK_MS  NEEDS_AE  LAST_ANTI_ENTROPY",
                "r1      -    -       -       -        -      -         -         -",
            ]
        );
        let empty = render_status(&json!({"region": "r1", "cluster_id": "c"})).expect("renders");
        assert!(empty.ends_with("(no regions listed)\n"));
    }

    #[test]
    fn refuses_documents_of_the_wrong_shape() {
        assert!(render_status(&json!([1, 2])).is_err());
        assert!(render_status(&json!({"regions": 3})).is_err());
    }
}
