//! A workload's labels, and a policy's selector: a few key-value pairs, sorted by key, in one
//! exactly sized slice.
//!
//! A `BTreeMap` would do the same job, but its first node has room for eleven entries: about
//! 540 bytes for the one or two labels a pod usually has. The controller holds a record of
//! every workload in the cluster, so that was its largest single cost per workload
//! (docs/benchmarks.md, "Control-plane scale"). Written and read as a map, as before.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    /// The value of label `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| &self.0[i].1)
    }

    /// The labels, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every label of `selector` is one of these, with the same value.
    pub fn contains_all<'a>(&self, selector: impl IntoIterator<Item = (&'a String, &'a String)>) -> bool {
        selector.into_iter().all(|(k, v)| self.get(k) == Some(v))
    }
}

/// A key given twice keeps its last value, as a map would.
impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(m: BTreeMap<String, String>) -> Self {
        Labels(m.into_iter().collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (String, String)>, fn(&'a (String, String)) -> (&'a String, &'a String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = String;

    fn index(&self, key: &str) -> &String {
        self.get(key).unwrap_or_else(|| panic!("no label {key:?}"))
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Labels::from)
    }
}

/// The schema of a map of strings, as a policy's `matchLabels` had before (the CRDs are
/// generated from it).
impl schemars::JsonSchema for Labels {
    fn inline_schema() -> bool {
        <BTreeMap<String, String> as schemars::JsonSchema>::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        <BTreeMap<String, String> as schemars::JsonSchema>::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        <BTreeMap<String, String> as schemars::JsonSchema>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <BTreeMap<String, String> as schemars::JsonSchema>::json_schema(generator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_as_a_map_and_finds_by_key() {
        let l: Labels = serde_yaml::from_str("{tier: web, app: a, zone: z1}").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l.get("app").map(String::as_str), Some("a"));
        assert_eq!(l["tier"], "web");
        assert_eq!(l.get("nope"), None);
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"app":"a","tier":"web","zone":"z1"}"#);
        let sel = BTreeMap::from([("app".to_string(), "a".to_string()), ("zone".to_string(), "z1".to_string())]);
        assert!(l.contains_all(&sel));
        let other = BTreeMap::from([("app".to_string(), "b".to_string())]);
        assert!(!l.contains_all(&other));
        assert!(Labels::default().contains_all(&BTreeMap::new()));
    }

    #[test]
    fn a_key_given_twice_keeps_its_last_value() {
        let l: Labels = [("a".to_string(), "1".to_string()), ("a".to_string(), "2".to_string())].into();
        assert_eq!((l.len(), l["a"].as_str()), (1, "2"));
    }

    /// A policy's selector reads and writes as it did when it was a map, and selects by it.
    #[test]
    fn a_policy_selector_is_the_same_map_on_the_wire() {
        use crate::policy::AuthorizationPolicySpec;
        let spec: AuthorizationPolicySpec =
            serde_yaml::from_str("selector: {matchLabels: {tier: front, app: web}}\naction: ALLOW\n").unwrap();
        let sel = &spec.selector.as_ref().unwrap().match_labels;
        let json = serde_json::to_string(&spec.selector).unwrap();
        assert_eq!(json, r#"{"matchLabels":{"app":"web","tier":"front"}}"#);
        let pod: Labels = serde_yaml::from_str("{app: web, tier: front, zone: a}").unwrap();
        assert!(pod.contains_all(sel) && !Labels::from([("app".into(), "web".into())]).contains_all(sel));
        let empty: AuthorizationPolicySpec = serde_yaml::from_str("selector: {}\n").unwrap();
        assert!(empty.selector.unwrap().match_labels.is_empty());
        let typo = serde_yaml::from_str::<AuthorizationPolicySpec>("selector: {matchLabel: {app: web}}\n");
        assert!(typo.unwrap_err().to_string().contains("matchLabel"));
    }
}
