//! Compiling a policy into a resource trie, once per policy revision.
//!
//! The trie has one root per resource type and one node per resource that some entry names,
//! plus the nodes on the way there. Each node keeps the grant/revoke *records* that name it
//! (subject, entry, effects). Nothing here depends on who asks, where, or when: that is folded
//! in later by [`crate::Enforcer::for_subjects`], which turns the records into a few bits per node.

use std::collections::{BTreeMap, HashMap};

use crate::model::{
    Effects, Importable, Label, NamespacePattern, Policy, PolicyEntry, PolicyId, ResourceKey,
    ResourceType, namespaces_apply,
};
use crate::timestamp::Timestamp;

/// No node / no parent.
pub(crate) const NONE: u32 = u32::MAX;

/// A node of the resource trie.
#[derive(Debug)]
pub(crate) struct Node {
    pub parent: u32,
    /// Outgoing edges: `edges[first_edge .. first_edge + edge_count]`, sorted by key bytes.
    pub first_edge: u32,
    pub edge_count: u32,
    /// This node's records: `records[first_record .. first_record + record_count]`, sorted by
    /// subject so that one subject's records are adjacent.
    pub first_record: u32,
    pub record_count: u32,
}

/// A labelled edge to a child node; the label is `keys[key_start .. key_start + key_len]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Edge {
    /// The label's first 8 bytes, zero-padded ([`prefix_of`]): most comparisons end here.
    pub prefix: u64,
    /// Selects the label's bytes among the first 8 (all ones for labels of 8 bytes or more).
    pub mask: u64,
    /// The label's bytes 8 to 15, zero-padded, and their mask: labels up to 16 bytes compare
    /// as two numbers.
    pub prefix2: u64,
    pub mask2: u64,
    pub key_start: u32,
    pub key_len: u32,
    pub child: u32,
    /// The label holds a `~`: an encoded path segment must be decoded to compare with it.
    /// Labels without `~` compare equal to a raw segment exactly when to its decoding, so most
    /// checks never scan for `~0`.
    pub tilde: bool,
}

/// The mask that keeps the first `len` bytes (at most 8) of a little-endian 8-byte number.
pub(crate) fn mask_of(len: usize) -> u64 {
    match len {
        0 => 0,
        1..8 => u64::MAX >> (64 - 8 * len),
        _ => u64::MAX,
    }
}

/// The first 8 bytes of `key` as a number, zero-padded; equal keys have equal prefixes.
#[inline]
pub(crate) fn prefix_of(key: &[u8]) -> u64 {
    if let Some(first) = key.first_chunk::<8>() {
        return u64::from_le_bytes(*first);
    }
    let mut buf = [0u8; 8];
    for (slot, byte) in buf.iter_mut().zip(key) {
        *slot = *byte;
    }
    u64::from_le_bytes(buf)
}

/// One subject's grant/revoke at one node, from one entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    pub subject: u32,
    pub entry: u32,
    /// The subject's expiry in that entry (a subject may expire in one entry and not another).
    pub expiry: Option<Timestamp>,
    pub effects: Effects,
}

/// What the enforcer remembers of an entry.
#[derive(Debug)]
pub(crate) struct CompiledEntry {
    /// The entry's label; imported entries are labelled `imported-<policyId>-<label>` as in Ditto.
    pub label: String,
    pub namespaces: Option<Vec<NamespacePattern>>,
}

impl CompiledEntry {
    pub fn applies_to(&self, namespace: Option<&str>) -> bool {
        namespaces_apply(self.namespaces.as_deref(), namespace)
    }
}

/// The compiled, immutable form of one policy revision.
#[derive(Debug)]
pub(crate) struct Trie {
    pub roots: [u32; ResourceType::ALL.len()],
    pub nodes: Vec<Node>,
    /// The resource each node stands for (explanations only; kept out of [`Node`] so the
    /// nodes a check walks stay small).
    pub resources: Vec<ResourceKey>,
    pub edges: Vec<Edge>,
    pub keys: String,
    pub records: Vec<Record>,
    pub subjects: HashMap<Box<str>, u32>,
    pub subject_names: Vec<Box<str>>,
    pub entries: Vec<CompiledEntry>,
}

/// The entries that take part in evaluation: the policy's own, then the imported ones.
///
/// `imported` holds the policies named in `policy.imports` (others are ignored; a missing one
/// contributes nothing, as in Ditto when an imported policy is deleted). Imports of imported
/// policies are not followed.
pub fn effective_entries<'p>(
    policy: &'p Policy,
    imported: &[&'p Policy],
) -> Vec<(String, &'p PolicyEntry)> {
    let mut out: Vec<(String, &PolicyEntry)> = policy
        .entries
        .iter()
        .map(|(label, entry)| (label.as_str().to_owned(), entry))
        .collect();
    for (id, import) in &policy.imports {
        let Some(source) = imported.iter().find(|p| p.policy_id.as_ref() == Some(id)) else {
            continue;
        };
        for (label, entry) in &source.entries {
            let wanted = match entry.importable {
                Importable::Implicit => true,
                Importable::Explicit => import.entries.contains(label),
                Importable::Never => false,
            };
            if wanted {
                out.push((imported_label(id, label), entry));
            }
        }
    }
    out
}

fn imported_label(id: &PolicyId, label: &Label) -> String {
    format!("imported-{id}-{label}")
}

/// A node while building: children by decoded key.
struct Building {
    parent: u32,
    children: BTreeMap<String, u32>,
    records: Vec<Record>,
    resource: ResourceKey,
}

pub(crate) fn compile(policy: &Policy, imported: &[&Policy]) -> Trie {
    let mut building: Vec<Building> = Vec::new();
    let mut roots = [NONE; ResourceType::ALL.len()];
    let mut subjects: HashMap<Box<str>, u32> = HashMap::new();
    let mut subject_names: Vec<Box<str>> = Vec::new();
    let mut entries = Vec::new();

    for (entry_index, (label, entry)) in effective_entries(policy, imported).into_iter().enumerate()
    {
        let entry_index = u32::try_from(entry_index).unwrap_or(NONE);
        entries.push(CompiledEntry {
            label,
            namespaces: entry.namespaces.clone(),
        });
        // Rule 7: an entry without subjects or without resources takes no part.
        if entry.subjects.is_empty() || entry.resources.is_empty() {
            continue;
        }
        for (key, effects) in &entry.resources {
            if effects.grant.is_empty() && effects.revoke.is_empty() {
                continue;
            }
            let node = node_for(&mut building, &mut roots, key);
            for (subject_id, subject) in &entry.subjects {
                let next = u32::try_from(subject_names.len()).unwrap_or(NONE);
                let subject_index =
                    *subjects
                        .entry(subject_id.as_str().into())
                        .or_insert_with(|| {
                            subject_names.push(subject_id.as_str().into());
                            next
                        });
                if let Some(n) = building.get_mut(node as usize) {
                    n.records.push(Record {
                        subject: subject_index,
                        entry: entry_index,
                        expiry: subject.expiry,
                        effects: *effects,
                    });
                }
            }
        }
    }

    // Flatten: nodes keep their indices (a child always has a larger index than its parent).
    let mut nodes = Vec::with_capacity(building.len());
    let mut resources = Vec::with_capacity(building.len());
    let mut edges = Vec::new();
    let mut keys = String::new();
    let mut records = Vec::new();
    for mut b in building {
        let first_edge = u32::try_from(edges.len()).unwrap_or(NONE);
        for (key, child) in &b.children {
            let key_start = u32::try_from(keys.len()).unwrap_or(NONE);
            keys.push_str(key);
            let bytes = key.as_bytes();
            let second = bytes.get(8..).unwrap_or(&[]);
            edges.push(Edge {
                prefix: prefix_of(bytes),
                mask: mask_of(bytes.len()),
                prefix2: prefix_of(second),
                mask2: mask_of(second.len()),
                key_start,
                key_len: u32::try_from(key.len()).unwrap_or(NONE),
                child: *child,
                tilde: key.contains('~'),
            });
        }
        b.records.sort_by_key(|r| (r.subject, r.entry));
        let first_record = u32::try_from(records.len()).unwrap_or(NONE);
        records.extend_from_slice(&b.records);
        nodes.push(Node {
            parent: b.parent,
            first_edge,
            edge_count: u32::try_from(b.children.len()).unwrap_or(NONE),
            first_record,
            record_count: u32::try_from(b.records.len()).unwrap_or(NONE),
        });
        resources.push(b.resource);
    }
    Trie {
        roots,
        nodes,
        resources,
        edges,
        keys,
        records,
        subjects,
        subject_names,
        entries,
    }
}

/// The node for `key`, creating it and its ancestors as needed.
fn node_for(building: &mut Vec<Building>, roots: &mut [u32], key: &ResourceKey) -> u32 {
    let kind = key.kind();
    let root_slot = kind.index();
    let mut node = match roots.get(root_slot) {
        Some(&r) if r != NONE => r,
        _ => {
            let r = new_node(building, NONE, ResourceKey::root(kind));
            if let Some(slot) = roots.get_mut(root_slot) {
                *slot = r;
            }
            r
        }
    };
    let mut walked: Vec<&str> = Vec::new();
    for segment in key.segments() {
        walked.push(segment);
        let existing = building
            .get(node as usize)
            .and_then(|n| n.children.get(segment).copied());
        node = match existing {
            Some(child) => child,
            None => {
                let resource = ResourceKey::from_decoded(kind, walked.iter().copied());
                let child = new_node(building, node, resource);
                if let Some(n) = building.get_mut(node as usize) {
                    n.children.insert(segment.to_owned(), child);
                }
                child
            }
        };
    }
    node
}

fn new_node(building: &mut Vec<Building>, parent: u32, resource: ResourceKey) -> u32 {
    let index = u32::try_from(building.len()).unwrap_or(NONE);
    building.push(Building {
        parent,
        children: BTreeMap::new(),
        records: Vec::new(),
        resource,
    });
    index
}
