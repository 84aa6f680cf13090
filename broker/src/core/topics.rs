//! The subscription tree: which subscriptions match a topic name (MQTT 3.1.1 §4.7, 5.0 §4.7).
//!
//! One tree per solution (its own topic space, DESIGN.md §3). Filters are stored level by level;
//! `+` is a child of its own, `#` a list of subscriptions at the level it follows. Matching a
//! topic walks the tree once along its levels, following the exact child and the `+` child at
//! each level, so its cost depends on the topic's depth and the number of wildcard branches, not
//! on the number of subscriptions.
//!
//! Rules implemented here (the codec has already checked that filters and names are valid):
//! - `#` matches its parent level and every level below (`a/#` matches `a`, `a/b`, `a/b/c`);
//! - `+` matches exactly one level, which may be empty (`a/+` matches `a/`, not `a`);
//! - levels are compared byte for byte, case-sensitive; empty levels are levels;
//! - a topic name starting with `$` is not matched by a filter whose first level is `+` or `#`
//!   (§4.7.2); `$share/…` filters are taken apart by the caller, which inserts the inner filter.

use std::collections::HashMap;

/// Subscriptions of type `T` (e.g. a session handle with its options), by topic filter.
#[derive(Debug)]
pub struct TopicTree<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    children: HashMap<Box<str>, Node<T>, foldhash::fast::RandomState>,
    plus: Option<Box<Node<T>>>,
    /// Subscriptions whose filter ends here (`a/b` at the node of `b`).
    exact: Vec<T>,
    /// Subscriptions whose filter is this level followed by `#`.
    hash: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: HashMap::default(),
            plus: None,
            exact: Vec::new(),
            hash: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.hash.is_empty()
    }
}

impl<T> Default for TopicTree<T> {
    fn default() -> Self {
        TopicTree {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T> TopicTree<T> {
    pub fn new() -> Self {
        TopicTree::default()
    }

    /// Subscriptions stored (the property test checks it against a model).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a subscription under `filter` (a valid topic filter, without `$share/group/`).
    pub fn insert(&mut self, filter: &str, subscription: T) {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                node.hash.push(subscription);
                self.len += 1;
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                node.exact.push(subscription);
                self.len += 1;
                return;
            }
        }
    }

    /// Removes the subscriptions under `filter` for which `matches` holds; returns how many.
    /// Branches left empty are pruned.
    pub fn remove(&mut self, filter: &str, mut matches: impl FnMut(&T) -> bool) -> usize {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, &mut matches);
        self.len -= removed;
        removed
    }

    /// Calls `f` with every subscription whose filter matches `topic` (a valid topic name).
    /// A subscription stored under several matching filters is seen once per filter.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&T)) {
        let dollar = topic.starts_with('$');
        visit(&self.root, topic, true, dollar, &mut f);
    }
}

/// Whether `filter` (without `$share/group/`) matches `topic`: the same rules as the tree, for
/// one pair (retained messages are matched against a new subscription this way).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn remove_at<T>(
    node: &mut Node<T>,
    levels: &[&str],
    matches: &mut impl FnMut(&T) -> bool,
) -> usize {
    let Some((&level, rest)) = levels.split_first() else {
        return 0;
    };
    if level == "#" {
        let before = node.hash.len();
        node.hash.retain(|s| !matches(s));
        return before - node.hash.len();
    }
    if level == "+" {
        let Some(child) = node.plus.as_deref_mut() else {
            return 0;
        };
        let removed = remove_here_or_below(child, rest, matches);
        if child.is_empty() {
            node.plus = None;
        }
        removed
    } else {
        let Some(child) = node.children.get_mut(level) else {
            return 0;
        };
        let removed = remove_here_or_below(child, rest, matches);
        if child.is_empty() {
            node.children.remove(level);
        }
        removed
    }
}

fn remove_here_or_below<T>(
    child: &mut Node<T>,
    rest: &[&str],
    matches: &mut impl FnMut(&T) -> bool,
) -> usize {
    if rest.is_empty() {
        let before = child.exact.len();
        child.exact.retain(|s| !matches(s));
        before - child.exact.len()
    } else {
        remove_at(child, rest, matches)
    }
}

/// Visits `node` (reached by the levels before `rest`). `first`: no level consumed yet.
fn visit<T>(node: &Node<T>, rest: &str, first: bool, dollar: bool, f: &mut impl FnMut(&T)) {
    // `#` after this level matches this level itself and everything below it; at the root it
    // is the filter `#`, which must not match `$` topics.
    if !(first && dollar) {
        node.hash.iter().for_each(&mut *f);
    }
    let (level, remainder) = match rest.split_once('/') {
        Some((level, remainder)) => (level, Some(remainder)),
        None => (rest, None),
    };
    if let Some(child) = node.children.get(level) {
        visit_child(child, remainder, dollar, f);
    }
    if let Some(plus) = node.plus.as_deref()
        && !(first && dollar)
    {
        visit_child(plus, remainder, dollar, f);
    }
}

fn visit_child<T>(child: &Node<T>, remainder: Option<&str>, dollar: bool, f: &mut impl FnMut(&T)) {
    match remainder {
        None => {
            child.exact.iter().for_each(&mut *f);
            // `a/#` also matches `a`.
            child.hash.iter().for_each(&mut *f);
        }
        Some(rest) => visit(child, rest, false, dollar, f),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;
    use proptest::prelude::*;

    /// The specification's rule, written for obviousness: level by level.
    fn naive_matches(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if topic.starts_with('$') && matches!(f.first(), Some(&"+") | Some(&"#")) {
            return false;
        }
        let mut i = 0;
        loop {
            match (f.get(i), t.get(i)) {
                (Some(&"#"), _) => return true,
                (Some(&"+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
            i += 1;
        }
    }

    fn matching(tree: &TopicTree<usize>, topic: &str) -> Vec<usize> {
        let mut out = Vec::new();
        tree.for_each_match(topic, |s| out.push(*s));
        out.sort_unstable();
        out
    }

    #[test]
    fn the_specifications_examples_match() {
        let filters = [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/+",
            "/+",
            "sport/+",
            "sport/+/player1",
            "+/tennis/#",
            "$SYS/#",
            "$SYS/monitor/+",
        ];
        let mut tree = TopicTree::new();
        for (i, f) in filters.iter().enumerate() {
            tree.insert(f, i);
        }
        let expect = |topic: &str| -> Vec<usize> {
            (0..filters.len())
                .filter(|&i| naive_matches(filters[i], topic))
                .collect()
        };
        // §4.7.1.2: `sport/tennis/player1/#` matches these three.
        for topic in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(matching(&tree, topic).contains(&0), "{topic}");
        }
        // `sport/#` matches `sport`; `sport/+` does not match `sport` but matches `sport/`.
        assert!(matching(&tree, "sport").contains(&1));
        assert!(!matching(&tree, "sport").contains(&6));
        assert!(matching(&tree, "sport/").contains(&6));
        // `/+` matches `/finance`; `+/+` too; `+` does not.
        assert_eq!(matching(&tree, "/finance"), expect("/finance"));
        assert!(
            matching(&tree, "/finance").contains(&5) && !matching(&tree, "/finance").contains(&3)
        );
        // §4.7.2: `$` topics are not matched by leading wildcards.
        assert_eq!(matching(&tree, "$SYS/monitor/Clients"), vec![9, 10]);
        for topic in [
            "sport/tennis/player1",
            "a",
            "",
            "/",
            "a/b/c/d",
            "sport/tennis",
            "$SYS",
        ] {
            assert_eq!(matching(&tree, topic), expect(topic), "{topic}");
        }
    }

    #[test]
    fn removing_prunes_and_keeps_others() {
        let mut tree = TopicTree::new();
        tree.insert("a/+/c", 1);
        tree.insert("a/+/c", 2);
        tree.insert("a/#", 3);
        assert_eq!(tree.remove("a/+/c", |s| *s == 1), 1);
        assert_eq!(matching(&tree, "a/b/c"), vec![2, 3]);
        assert_eq!(tree.remove("a/+/c", |_| true), 1);
        assert_eq!(tree.remove("a/#", |_| true), 1);
        assert_eq!(tree.remove("x/y", |_| true), 0);
        assert!(tree.is_empty());
        assert!(tree.root.is_empty(), "empty branches are pruned");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("".to_owned()),
            Just("$x".to_owned())
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![3 => level(), 1 => Just("+".to_owned())], 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut l, hash)| {
                if hash {
                    l.push("#".to_owned());
                }
                l.join("/")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn the_pairwise_match_agrees_with_the_specifications_rule(
            f in filter(), t in topic()
        ) {
            prop_assert_eq!(matches(&f, &t), naive_matches(&f, &t));
        }

        #[test]
        fn the_tree_agrees_with_the_specifications_rule(
            filters in prop::collection::vec(filter(), 0..12),
            topics in prop::collection::vec(topic(), 1..8),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        ) {
            let mut tree = TopicTree::new();
            for (i, f) in filters.iter().enumerate() {
                tree.insert(f, i);
            }
            let mut live: Vec<bool> = vec![true; filters.len()];
            for r in removed {
                if filters.is_empty() { break; }
                let i = r.index(filters.len());
                let n = tree.remove(&filters[i], |s| *s == i);
                prop_assert_eq!(n, usize::from(live[i]));
                live[i] = false;
            }
            prop_assert_eq!(tree.len(), live.iter().filter(|l| **l).count());
            for t in &topics {
                let expected: Vec<usize> = (0..filters.len()).filter(|&i| live[i] && naive_matches(&filters[i], t)).collect();
                prop_assert_eq!(matching(&tree, t), expected, "topic {:?} filters {:?}", t, filters);
            }
        }
    }
}
