//! Reading Prometheus text exposition.

/// The value of one Prometheus sample whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if all {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// Node `n`'s agent's metrics (`:15020/metrics`), which must answer 200.
pub fn scrape(t: &crate::Topology, n: crate::NodeId) -> String {
    let (status, body) = crate::http_get(&t.node(n).netns, "127.0.0.1:15020", "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}
