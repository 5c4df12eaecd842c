//! Reshaping changes for one target: the route mapping and script, the 1C XDTO format,
//! references (`missing_refs = "wait"`: a change waits for references the target doesn't
//! have yet; referenced objects in a batch go first) and the remap of refs to the target's
//! own. [`Shaping`] is built once per target from the config; its pure parts ([`Shaping::plan`],
//! [`Shaping::render`]) are what the offline preview (`lxbridge transform`) uses too, so the
//! preview and the delivery cannot disagree.

use super::{Core, FailedChange, Item};
use crate::broker::Incoming;
use crate::config::{Config, DeliverConfig, Format, MissingRefs};
use crate::model::{Op, StoredChange};
use crate::store::MarkKey;
use crate::transform::{self, Compiled, Outcome, Reference, Remap};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How this target's changes are reshaped, from the routes to it and its deliver config.
pub struct Shaping {
    pub routes: Vec<RouteShape>,
    pub identity: Arc<Compiled>,
    pub format: Format,
    pub missing_refs: MissingRefs,
    pub remap: bool,
    /// False when nothing reshapes (the zero-copy path).
    pub needed: bool,
}

/// One route into this target.
pub struct RouteShape {
    pub source: String,
    /// Topic patterns of the route's types.
    pub patterns: Vec<String>,
    pub mapping: Arc<Compiled>,
}

/// A change reshaped for its target by the route mapping, format and remap.
pub(crate) struct Shaped {
    pub kind: String,
    pub reference: String,
    pub op: Op,
    pub data: Option<Box<RawValue>>,
    pub target_ref: Option<String>,
}

/// What the target's shaping makes of one change before the store is asked anything.
pub struct Plan {
    pub mapping: Arc<Compiled>,
    /// Every reference the change carries (remapped when the target remaps).
    pub refs: Vec<Reference>,
    /// The references it waits for with `missing_refs = "wait"`: only those to types routed
    /// from the same source to this target (anything else would never arrive).
    pub awaited: Vec<Reference>,
    /// The key match pair (`key:ИНН=…`) when remapping and the type names a key.
    pub key: Option<String>,
}

impl Shaping {
    /// The shaping of `target`: the mappings of the routes into it, its format and its
    /// reference handling. Errors are the mapping problems `validate` reports.
    pub fn from_config(
        config: &Config,
        target: &str,
        deliver: &DeliverConfig,
    ) -> Result<Shaping, Vec<String>> {
        let mut routes = Vec::new();
        for route in config
            .routes
            .iter()
            .filter(|r| r.to.iter().any(|t| t == target))
        {
            routes.push(RouteShape {
                source: route.from.clone(),
                patterns: route
                    .types
                    .iter()
                    .map(|p| crate::route::topic_pattern(p))
                    .collect(),
                mapping: Arc::new(config.compiled_mapping(route)?),
            });
        }
        let needed = deliver.format != Format::Lxbridge
            || deliver.missing_refs != MissingRefs::Ignore
            || deliver.remaps()
            || routes.iter().any(|r| !r.mapping.is_identity());
        Ok(Shaping {
            routes,
            identity: Arc::new(Compiled::identity()),
            format: deliver.format,
            missing_refs: deliver.missing_refs,
            remap: deliver.remaps(),
            needed,
        })
    }

    fn waits(&self) -> bool {
        self.missing_refs == MissingRefs::Wait
    }

    /// The route that brings `kind` from `source` to this target.
    fn route_for(&self, source: &str, kind: &str) -> Option<&RouteShape> {
        self.routes.iter().find(|r| {
            r.source == source
                && r.patterns
                    .iter()
                    .any(|p| crate::route::topic_matches(p, kind))
        })
    }

    /// The mapping of the route that brings `kind` from `source` to this target.
    pub fn mapping_for(&self, source: &str, kind: &str) -> Arc<Compiled> {
        self.route_for(source, kind)
            .map(|r| r.mapping.clone())
            .unwrap_or_else(|| self.identity.clone())
    }

    /// The mapping, references and key of `change` (from `change.source`) for this target.
    pub fn plan(&self, change: &transform::Change) -> Plan {
        let mapping = self.mapping_for(&change.source, &change.kind);
        let refs = if self.waits() || self.remap {
            mapping.references(change)
        } else {
            Vec::new()
        };
        let awaited = if self.waits() {
            let routed = |r: &&Reference| self.route_for(&change.source, &r.kind).is_some();
            refs.iter().filter(routed).cloned().collect()
        } else {
            Vec::new()
        };
        let key = if self.remap {
            mapping.key_of(change).map(|k| format!("key:{k}"))
        } else {
            None
        };
        Plan {
            mapping,
            refs,
            awaited,
            key,
        }
    }

    /// The `data` the target receives for a mapped change, in its format.
    pub fn render(&self, change: &transform::Change) -> Option<Value> {
        match self.format {
            Format::Lxbridge => change.data.clone(),
            Format::Xdto => Some(transform::to_xdto(change)),
        }
    }
}

/// A change on its way through [`Core::shape`].
struct ShapeItem {
    message: Incoming,
    stored: StoredChange,
    change: transform::Change,
    plan: Plan,
}

impl ShapeItem {
    fn own(&self) -> (String, String) {
        (self.stored.kind.clone(), self.stored.reference.clone())
    }
}

/// The references of a batch the target already has, by (source, type, ref); extended as
/// the batch's own changes are shaped (earlier in the batch counts as delivered).
type Present = HashSet<(String, String, String)>;

/// What became of one change in [`Core::shape`].
enum ShapeOutcome {
    Send(Item),
    Filtered(Incoming, StoredChange, String),
    Failed(FailedChange),
}

impl Core {
    /// Reshapes changes for the target. Filtered and failed changes are handed back;
    /// `None` when cancelled while the store was away (nothing is acked then).
    pub(super) async fn shape(
        &self,
        send: Vec<(Incoming, StoredChange)>,
        filtered: &mut Vec<(Incoming, StoredChange, String)>,
        failed: &mut Vec<FailedChange>,
        cancel: &CancellationToken,
    ) -> Option<Vec<Item>> {
        if !self.shaping.needed {
            return Some(send.into_iter().map(Item::unshaped).collect());
        }
        let mut items = self.plan_items(send, failed);
        referenced_first(&mut items);
        let mut present = match self.shaping.waits() {
            true => Some(self.present_refs(&items, cancel).await?),
            false => None,
        };
        let remap = self.remap_of(&items, cancel).await?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match self.finish(item, &remap, present.as_mut()) {
                ShapeOutcome::Send(item) => out.push(item),
                ShapeOutcome::Filtered(message, change, why) => {
                    filtered.push((message, change, why))
                }
                ShapeOutcome::Failed(f) => failed.push(f),
            }
        }
        Some(out)
    }

    /// Parses each change's data and plans it; one whose data is not JSON fails for good.
    fn plan_items(
        &self,
        send: Vec<(Incoming, StoredChange)>,
        failed: &mut Vec<FailedChange>,
    ) -> Vec<ShapeItem> {
        let mut items = Vec::with_capacity(send.len());
        for (message, stored) in send {
            let data = match stored
                .data
                .as_deref()
                .map(|raw| serde_json::from_str(raw.get()))
            {
                None => None,
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    failed.push(FailedChange {
                        message,
                        change: stored,
                        error: format!("data is not JSON: {e}"),
                        dead: true,
                        alone: false,
                        event: "failed",
                    });
                    continue;
                }
            };
            let change = transform::Change {
                id: stored.id.clone(),
                kind: stored.kind.clone(),
                reference: stored.reference.clone(),
                op: stored.op,
                data,
                source: stored.source.clone(),
                seq: stored.seq,
            };
            let plan = self.shaping.plan(&change);
            items.push(ShapeItem {
                message,
                stored,
                change,
                plan,
            });
        }
        items
    }

    /// Which awaited references the target already has (their delivery marks).
    async fn present_refs(
        &self,
        items: &[ShapeItem],
        cancel: &CancellationToken,
    ) -> Option<Present> {
        let keys: Vec<(String, String, String)> = items
            .iter()
            .flat_map(|i| {
                let source = &i.stored.source;
                i.plan
                    .awaited
                    .iter()
                    .map(move |r| (source.clone(), r.kind.clone(), r.reference.clone()))
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mark_keys: Vec<MarkKey<'_>> = keys
            .iter()
            .map(|(source, kind, reference)| MarkKey {
                source,
                kind,
                reference,
            })
            .collect();
        let marks = self
            .until_store(cancel, || self.store.marks(&self.name, &mark_keys))
            .await?;
        Some(
            keys.into_iter()
                .zip(marks)
                .filter(|(_, m)| m.is_some())
                .map(|(k, _)| k)
                .collect(),
        )
    }

    /// The target refs the store knows for the batch's objects, references and keys, plus
    /// the key matches: an object the target doesn't know by ref, but whose key value it
    /// knows from another object, takes that target ref (stored from now on).
    async fn remap_of(&self, items: &[ShapeItem], cancel: &CancellationToken) -> Option<Remap> {
        if !self.shaping.remap {
            return Some(Remap::new());
        }
        let pairs: Vec<(String, String)> = items
            .iter()
            .flat_map(|i| {
                let kind = &i.stored.kind;
                i.plan
                    .refs
                    .iter()
                    .map(|r| (r.kind.clone(), r.reference.clone()))
                    .chain(std::iter::once(i.own()))
                    .chain(i.plan.key.iter().map(move |k| (kind.clone(), k.clone())))
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let borrowed: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, r)| (k.as_str(), r.as_str()))
            .collect();
        let found = self
            .until_store(cancel, || self.store.remap_get(&self.name, &borrowed))
            .await?;
        let mut remap: Remap = pairs
            .into_iter()
            .zip(found)
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        self.match_keys(items, &mut remap).await;
        Some(remap)
    }

    /// The key match rule (see [`Core::remap_of`]).
    async fn match_keys(&self, items: &[ShapeItem], remap: &mut Remap) {
        let mut matched: Vec<(String, String, String)> = Vec::new();
        for item in items {
            let own = item.own();
            let Some(key) = &item.plan.key else { continue };
            if remap.contains_key(&own) {
                continue;
            }
            if let Some(target_ref) = remap.get(&(own.0.clone(), key.clone())).cloned() {
                matched.push((own.0.clone(), own.1.clone(), target_ref.clone()));
                remap.insert(own, target_ref);
            }
        }
        if matched.is_empty() {
            return;
        }
        let triples: Vec<(&str, &str, &str)> = matched
            .iter()
            .map(|(k, s, t)| (k.as_str(), s.as_str(), t.as_str()))
            .collect();
        if let Err(e) = self.store.remap_put(&self.name, &triples).await {
            warn!(target = %self.name, error = %e, "could not store key-matched target refs");
        }
    }

    /// Applies the mapping to one change; a change to deliver waits for references the
    /// target doesn't have yet (delivered before, or earlier in this batch).
    fn finish(
        &self,
        item: ShapeItem,
        remap: &Remap,
        present: Option<&mut Present>,
    ) -> ShapeOutcome {
        let ShapeItem {
            message,
            stored,
            change,
            plan,
        } = item;
        let fail = |message, stored, error, event| {
            ShapeOutcome::Failed(FailedChange {
                message,
                change: stored,
                error,
                dead: false,
                alone: false,
                event,
            })
        };
        let mapped = match plan.mapping.apply(change, remap) {
            Outcome::Deliver(c) => c,
            Outcome::Filtered(reason) => return ShapeOutcome::Filtered(message, stored, reason),
            Outcome::Failed(error) => return fail(message, stored, error, "failed"),
        };
        if let Some(present) = present {
            let missing = missing_refs(&stored.source, &plan.awaited, present);
            if !missing.is_empty() {
                let error = format!("missing reference {}", missing.join(", "));
                return fail(message, stored, error, "waiting");
            }
            present.insert((
                stored.source.clone(),
                stored.kind.clone(),
                stored.reference.clone(),
            ));
        }
        let target_ref = remap
            .get(&(stored.kind.clone(), stored.reference.clone()))
            .cloned();
        let data = self
            .shaping
            .render(&mapped)
            .map(|d| serde_json::value::to_raw_value(&d).expect("JSON values serialise"));
        let shaped = Shaped {
            kind: mapped.kind,
            reference: mapped.reference,
            op: mapped.op,
            data,
            target_ref,
        };
        ShapeOutcome::Send(Item {
            message,
            change: stored,
            shaped: Some(shaped),
        })
    }
}

/// The `awaited` references (of a change from `source`) the target doesn't have, as `type ref`.
fn missing_refs(source: &str, awaited: &[Reference], present: &Present) -> Vec<String> {
    awaited
        .iter()
        .filter(|r| !present.contains(&(source.to_string(), r.kind.clone(), r.reference.clone())))
        .map(|r| format!("{} {}", r.kind, r.reference))
        .collect()
}

/// Referenced objects first, so the target has them before what refers to them.
fn referenced_first(items: &mut [ShapeItem]) {
    let in_batch: HashSet<(String, String)> = items.iter().map(ShapeItem::own).collect();
    let referenced: HashSet<(String, String)> = items
        .iter()
        .flat_map(|i| {
            i.plan
                .refs
                .iter()
                .map(|r| (r.kind.clone(), r.reference.clone()))
        })
        .filter(|k| in_batch.contains(k))
        .collect();
    items.sort_by_key(|i| !referenced.contains(&i.own()));
}
