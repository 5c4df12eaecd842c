//! The RabbitMQ topology (docs/api.md "Broker topology"): [`Names`] of every exchange and queue
//! under the prefix, and [`Topology`], what to declare, computed once from the config and
//! declared on every connect: the source exchanges; per target a headers exchange routing
//! `lx-partition` to its delivery queue partitions (quorum, single active consumer), the
//! retry steps dead-lettering back into that exchange, the DLQ; per pull target its request
//! queue; the `<prefix>.instances` fanout. Also [`declared_names`], for clean-up tools.

use super::headers::long_string;
use crate::broker::{header, BrokerError};
use crate::config::{Config, DeliverMode};
use crate::route::Routes;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use std::time::Duration;

/// Queue and exchange names under the prefix (docs/api.md "Broker topology").
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn exchange(&self, source: &str) -> String {
        format!("{}.node.{source}", self.prefix)
    }
    /// The target's delivery queue: its partition 0.
    pub fn deliver(&self, target: &str) -> String {
        format!("{}.deliver.{target}", self.prefix)
    }
    /// Partition `p` of the target's delivery queue: `<prefix>.deliver.<target>` for 0,
    /// `<prefix>.deliver.<target>.<p>` for the others.
    pub fn partition(&self, target: &str, p: u16) -> String {
        match p {
            0 => self.deliver(target),
            p => format!("{}.deliver.{target}.{p}", self.prefix),
        }
    }
    /// The target's headers exchange: routes each change to its partition, from the source
    /// exchanges and from the retry steps.
    pub fn target_exchange(&self, target: &str) -> String {
        format!("{}.target.{target}", self.prefix)
    }
    /// A pull target's inbox requests (polls, acks), for the instance that serves it.
    pub fn inbox(&self, target: &str) -> String {
        format!("{}.inbox.{target}", self.prefix)
    }
    /// The fanout exchange the instances announce themselves on.
    pub fn instances(&self) -> String {
        format!("{}.instances", self.prefix)
    }
    /// An instance's own queue: the others' announcements and answers to its inbox requests.
    pub fn instance(&self, id: &str) -> String {
        format!("{}.instance.{id}", self.prefix)
    }
    pub fn retry(&self, target: &str, step: usize) -> String {
        format!("{}.retry.{target}.{step}", self.prefix)
    }
    pub fn dlq(&self, target: &str) -> String {
        format!("{}.dlq.{target}", self.prefix)
    }
}

/// Everything to declare, computed once from the config.
#[derive(Clone, Debug)]
pub(super) struct Topology {
    pub(super) names: Names,
    pub(super) sources: Vec<String>,
    /// Push targets, in config order (the order the partitions are shared out in).
    pub(super) push: Vec<String>,
    /// Pull targets: one delivery queue each, served by one instance.
    pub(super) pull: Vec<String>,
    /// Partitions of each push target's delivery queue.
    pub(super) partitions: u16,
    pub(super) retry_delays: Vec<Duration>,
    pub(super) bindings: Vec<(String, String, String)>, // (source exchange, target, pattern)
    /// `broker.quorum_replicas`: the replicas a quorum queue starts with.
    pub(super) quorum_replicas: Option<u8>,
}

impl Topology {
    pub(super) fn from_config(config: &Config, routes: &Routes) -> Topology {
        let names = Names {
            prefix: config.broker.prefix.clone(),
        };
        let bindings = routes
            .bindings()
            .map(|b| {
                (
                    names.exchange(&b.source),
                    b.target.clone(),
                    b.pattern.clone(),
                )
            })
            .collect();
        let with_mode = |pull: bool| {
            config
                .nodes
                .iter()
                .filter(|n| {
                    n.deliver
                        .as_ref()
                        .is_some_and(|d| (d.mode == DeliverMode::Pull) == pull)
                })
                .map(|n| n.name.clone())
                .collect()
        };
        Topology {
            sources: config.nodes.iter().map(|n| n.name.clone()).collect(),
            // A CommerceML site is delivered to as a push target is.
            push: with_mode(false),
            pull: with_mode(true),
            partitions: config.broker.partitions.max(1),
            retry_delays: config.retry.delays.iter().map(|d| d.0).collect(),
            quorum_replicas: config.broker.quorum_replicas,
            names,
            bindings,
        }
    }

    pub(super) fn targets(&self) -> impl Iterator<Item = &String> {
        self.push.iter().chain(&self.pull)
    }

    /// How many delivery queues the target has: `partitions` for a push target, one for a
    /// pull target.
    pub(super) fn partitions_of(&self, target: &str) -> u16 {
        if self.pull.iter().any(|t| t == target) {
            1
        } else {
            self.partitions
        }
    }

    /// Puts the partition header on a message bound for a push target's delivery queues
    /// (with one partition the bindings take every message: no header needed).
    pub(super) fn mark_partition(&self, headers: &mut FieldTable, partition: u16) {
        if self.partitions > 1 {
            headers.insert(
                header::PARTITION.into(),
                long_string(&partition.to_string()),
            );
        }
    }

    /// Every delivery queue of the target, partition 0 first.
    pub(super) fn delivery_queues(&self, target: &str) -> Vec<String> {
        (0..self.partitions_of(target))
            .map(|p| self.names.partition(target, p))
            .collect()
    }

    pub(super) async fn declare(&self, ch: &Channel) -> Result<(), BrokerError> {
        let topo = |what: String, e: lapin::Error| {
            BrokerError::Topology(format!(
                "declaring {what} failed: {e}. If it exists with other arguments (for example \
                 after retry.delays changed, or declared by an lxbridge before 0.2), move its \
                 messages with `lxbridge export`/`import` or delete it with `rabbitmqctl \
                 delete_queue`, then restart"
            ))
        };
        for source in &self.sources {
            let name = self.names.exchange(source);
            declare_exchange(ch, &name, ExchangeKind::Topic)
                .await
                .map_err(|e| topo(format!("exchange {name}"), e))?;
        }
        // Gone with the last instance's queue: it carries nothing that must outlive them.
        let instances = self.names.instances();
        let transient = ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        };
        ch.exchange_declare(
            instances.as_str().into(),
            ExchangeKind::Fanout,
            transient,
            FieldTable::default(),
        )
        .await
        .map_err(|e| topo(format!("exchange {instances}"), e))?;
        for target in self.targets() {
            self.declare_target(ch, target)
                .await
                .map_err(|(what, e)| topo(what, e))?;
        }
        for target in &self.pull {
            let name = self.names.inbox(target);
            let mut args = FieldTable::default();
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            ch.queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
                .await
                .map_err(|e| topo(format!("queue {name}"), e))?;
        }
        for (source, target, pattern) in &self.bindings {
            self.bind_route(ch, source, target, pattern)
                .await
                .map_err(|(what, e)| topo(what, e))?;
        }
        Ok(())
    }

    /// Binds a route's pattern from the source exchange into the target: straight to its one
    /// delivery queue, or to its headers exchange, which picks the partition (one hop more
    /// in RabbitMQ, paid only where there are partitions to pick from).
    async fn bind_route(
        &self,
        ch: &Channel,
        source: &str,
        target: &str,
        pattern: &str,
    ) -> Result<(), (String, lapin::Error)> {
        let (opts, args) = (QueueBindOptions::default(), FieldTable::default());
        if self.partitions_of(target) == 1 {
            let queue = self.names.deliver(target);
            return ch
                .queue_bind(
                    queue.as_str().into(),
                    source.into(),
                    pattern.into(),
                    opts,
                    args,
                )
                .await
                .map_err(|e| (format!("binding {source} -> {queue} ({pattern})"), e));
        }
        let exchange = self.names.target_exchange(target);
        ch.exchange_bind(
            exchange.as_str().into(),
            source.into(),
            pattern.into(),
            ExchangeBindOptions::default(),
            args,
        )
        .await
        .map_err(|e| (format!("binding {source} -> {exchange} ({pattern})"), e))
    }

    /// The arguments of every quorum queue: its type and, when configured, how many
    /// cluster nodes it is replicated on from the start.
    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if let Some(n) = self.quorum_replicas {
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongInt(i32::from(n)),
            );
        }
        args
    }

    /// A target's headers exchange, its delivery queues (single active consumer) bound to it
    /// by partition, its retry steps (dead-lettering back to the exchange, which routes by
    /// the partition header they keep) and its DLQ.
    async fn declare_target(
        &self,
        ch: &Channel,
        target: &str,
    ) -> Result<(), (String, lapin::Error)> {
        let exchange = self.names.target_exchange(target);
        declare_exchange(ch, &exchange, ExchangeKind::Headers)
            .await
            .map_err(|e| (format!("exchange {exchange}"), e))?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let partitions = self.partitions_of(target);
        for p in 0..partitions {
            let queue = self.names.partition(target, p);
            let mut args = self.quorum_args();
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            ch.queue_declare(queue.as_str().into(), durable, args)
                .await
                .map_err(|e| (format!("queue {queue}"), e))?;
            // A pull target's one queue takes every partition (an empty match takes all).
            let mut filter = FieldTable::default();
            filter.insert("x-match".into(), AMQPValue::LongString("all".into()));
            if partitions > 1 {
                filter.insert(header::PARTITION.into(), long_string(&p.to_string()));
            }
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                filter,
            )
            .await
            .map_err(|e| (format!("binding {exchange} -> {queue}"), e))?;
        }
        for (i, delay) in self.retry_delays.iter().enumerate() {
            let name = self.names.retry(target, i + 1);
            let mut args = self.quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(exchange.as_str().into()),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            ch.queue_declare(name.as_str().into(), durable, args)
                .await
                .map_err(|e| (format!("queue {name}"), e))?;
        }
        let dlq = self.names.dlq(target);
        ch.queue_declare(dlq.as_str().into(), durable, self.quorum_args())
            .await
            .map_err(|e| (format!("queue {dlq}"), e))?;
        Ok(())
    }
}

async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(name.into(), kind, durable, FieldTable::default())
        .await
}

/// The names of every exchange and queue lxbridge declares for `config` (for clean-up
/// tools and tests): (exchanges, queues). The instances' own queues go when they stop.
pub fn declared_names(config: &Config) -> (Vec<String>, Vec<String>) {
    let t = Topology::from_config(config, &Routes::from_config(config));
    let mut exchanges: Vec<String> = t.sources.iter().map(|s| t.names.exchange(s)).collect();
    exchanges.push(t.names.instances());
    let mut queues = Vec::new();
    for target in t.targets() {
        exchanges.push(t.names.target_exchange(target));
        queues.extend(t.delivery_queues(target));
        queues.extend((1..=t.retry_delays.len()).map(|step| t.names.retry(target, step)));
        queues.push(t.names.dlq(target));
    }
    queues.extend(t.pull.iter().map(|target| t.names.inbox(target)));
    (exchanges, queues)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let n = Names {
            prefix: "lx".into(),
        };
        assert_eq!(n.exchange("central"), "lx.node.central");
        assert_eq!(n.deliver("shop"), "lx.deliver.shop");
        assert_eq!(n.retry("shop", 2), "lx.retry.shop.2");
        assert_eq!(n.dlq("shop"), "lx.dlq.shop");
    }
}
