//! An AMQP 0.9.1 connection to an external broker (lapin): one task per connection that
//! connects, consumes each source's queues with manual acknowledgements and the source's
//! prefetch, settles every message as `inbound` decides (ack / nack with requeue / reject
//! without requeue, so the queue's dead-letter exchange gets it), sends answers to `reply-to`
//! through the default exchange, and publishes each target's buffer with publisher confirms.
//!
//! Every call to the broker is bounded by [`NETWORK_TIMEOUT`] (lapin can hang when the broker
//! goes away). Any failure — refused connect, a missing queue, a closed channel or connection,
//! a timeout — ends the attempt: the state says why, and after a backoff with jitter the task
//! connects again and resumes consuming. Messages it had not settled are redelivered by the
//! broker (at least once); a target's unconfirmed messages stay in its buffer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, SelectAll};
use futures_util::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{mpsc, watch};

use crate::bridge::config::Compiled;
use crate::bridge::inbound::{Handled, InOrder, Inbound, Settle, SourceRuntime, Step};
use crate::bridge::outbound::TargetRuntime;
use crate::bridge::{Backoff, NETWORK_TIMEOUT, State, Status};
use crate::core::Core;

/// A requeued message waits this long first, so a failing store is not hammered.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);
/// Target messages published before their confirms are awaited.
const CONFIRM_BATCH: usize = 256;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Why an attempt ended.
type Failure = String;

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(NETWORK_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {NETWORK_TIMEOUT:?}")),
    }
}

/// Runs connection `compiled` of `solution` until `stop` turns true.
pub async fn run(
    core: Arc<Core>,
    solution: String,
    compiled: Compiled,
    status: Arc<Status>,
    mut stop: watch::Receiver<bool>,
) {
    let id = compiled.doc.id.clone();
    let sources: Vec<Arc<SourceRuntime>> = compiled
        .sources
        .iter()
        .map(|s| {
            Arc::new(SourceRuntime::new(
                core.clone(),
                &solution,
                &id,
                s.clone(),
                status.clone(),
            ))
        })
        .collect();
    let mut targets: Vec<TargetRuntime> = Vec::new();
    for target in &compiled.targets {
        match TargetRuntime::new(core.clone(), &solution, &id, target.clone(), status.clone()) {
            Some(t) => targets.push(t),
            None => {
                status.set(State::Failed(
                    "a target's topics name a namespace the solution does not own".into(),
                ));
                crate::bridge::until_set(&mut stop).await;
                return;
            }
        }
    }
    let mut backoff = Backoff::default();
    loop {
        if *stop.borrow() {
            return;
        }
        status.set(State::Connecting);
        let attempt = Attempt {
            solution: &solution,
            id: &id,
            compiled: &compiled,
            sources: &sources,
            status: &status,
        };
        let (returned, result) = attempt.run(targets, &mut stop).await;
        targets = returned;
        match result {
            Ok(()) => return,
            Err(failure) => {
                tracing::warn!(solution = %solution, connection = %id, error = %failure, "bridge connection failed; connecting again after a backoff");
                if !crate::bridge::back_off(
                    &status,
                    &mut backoff,
                    failure,
                    Duration::ZERO,
                    &mut stop,
                )
                .await
                {
                    return;
                }
            }
        }
    }
}

struct Attempt<'a> {
    solution: &'a str,
    id: &'a str,
    compiled: &'a Compiled,
    sources: &'a [Arc<SourceRuntime>],
    status: &'a Arc<Status>,
}

/// One consumed message, with the source that consumed it.
type Consumed = (usize, lapin::Result<lapin::message::Delivery>);

impl Attempt<'_> {
    /// One connection: until `stop` (Ok) or a failure (Err). The targets come back in any case.
    async fn run(
        &self,
        targets: Vec<TargetRuntime>,
        stop: &mut watch::Receiver<bool>,
    ) -> (Vec<TargetRuntime>, Result<(), Failure>) {
        let connection = match self.connect().await {
            Ok(c) => c,
            Err(e) => return (targets, Err(e)),
        };
        let result = self.serve(&connection, targets, stop).await;
        let (targets, result) = match result {
            Ok((targets, r)) => (targets, r),
            Err(e) => return (Vec::new(), Err(e)),
        };
        // Best effort: the broker redelivers whatever was not settled anyway.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.close(200, "thingsgate bridge closing".into()),
        )
        .await;
        (targets, result)
    }

    async fn connect(&self) -> Result<Connection, Failure> {
        let name = format!("thingsgate:{}:{}", self.solution, self.id);
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(name.into_bytes()));
        bounded(
            &format!("connect to {}", self.compiled.endpoint.address()),
            Connection::connect(&self.compiled.doc.uri, properties),
        )
        .await
    }

    #[allow(clippy::too_many_lines)]
    async fn serve(
        &self,
        connection: &Connection,
        mut targets: Vec<TargetRuntime>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(Vec<TargetRuntime>, Result<(), Failure>), Failure> {
        // Consumers first: a missing queue fails the attempt before anything is started.
        let mut consumers: SelectAll<Pin<Box<dyn Stream<Item = Consumed> + Send>>> =
            SelectAll::new();
        let mut consumer_tags: Vec<(Channel, String)> = Vec::new();
        // One settler per source channel: acknowledgements in order, batched (see `settler`).
        let mut settlers: Vec<mpsc::UnboundedSender<Settlement>> = Vec::new();
        let mut settler_tasks = FuturesUnordered::new();
        for (index, source) in self.sources.iter().enumerate() {
            let channel = bounded("open a channel", connection.create_channel()).await;
            let channel = match channel {
                Ok(c) => c,
                Err(e) => return Ok((targets, Err(e))),
            };
            let prefetch = source.source().prefetch;
            if let Err(e) = bounded(
                "basic.qos",
                channel.basic_qos(prefetch, BasicQosOptions::default()),
            )
            .await
            {
                return Ok((targets, Err(e)));
            }
            for (n, queue) in source.source().addresses.iter().enumerate() {
                let tag = format!("thingsgate-{}-{index}-{n}", self.id);
                let consumer = bounded(
                    &format!("consume from queue `{queue}`"),
                    channel.basic_consume(
                        queue.as_str().into(),
                        tag.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await;
                match consumer {
                    Ok(consumer) => consumers.push(Box::pin(consumer.map(move |d| (index, d)))),
                    Err(e) => return Ok((targets, Err(e))),
                }
                consumer_tags.push((channel.clone(), tag));
            }
            let (to_settler, settled) = mpsc::unbounded_channel();
            settlers.push(to_settler);
            settler_tasks.push(tokio::spawn(settler(
                channel.clone(),
                settled,
                usize::from(prefetch),
            )));
        }
        let replies = match bounded("open a channel", connection.create_channel()).await {
            Ok(c) => c,
            Err(e) => return Ok((targets, Err(e))),
        };
        // Targets' exchanges must exist before anything is consumed: a missing one fails the
        // attempt now (and the backoff grows) instead of after commands were taken.
        for target in &targets {
            let exchange = &target.target().exchange;
            if exchange.is_empty() {
                continue;
            }
            let check = match bounded("open a channel", connection.create_channel()).await {
                Ok(c) => c,
                Err(e) => return Ok((targets, Err(e))),
            };
            let declared = bounded(
                &format!("target exchange `{exchange}`"),
                check.exchange_declare(
                    exchange.as_str().into(),
                    lapin::ExchangeKind::Topic,
                    lapin::options::ExchangeDeclareOptions {
                        passive: true,
                        ..lapin::options::ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
            if let Err(e) = declared {
                return Ok((targets, Err(e)));
            }
            let _ =
                tokio::time::timeout(Duration::from_secs(2), check.close(200, "checked".into()))
                    .await;
        }
        // Target pumps: each on a channel of its own with confirms, given back when halted.
        let (halt_tx, halt) = watch::channel(false);
        let mut channels = Vec::with_capacity(targets.len());
        for _ in &targets {
            let channel = match bounded("open a channel", connection.create_channel()).await {
                Ok(c) => c,
                Err(e) => return Ok((targets, Err(e))),
            };
            if let Err(e) = bounded(
                "confirm.select",
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await
            {
                return Ok((targets, Err(e)));
            }
            channels.push(channel);
        }
        let pumps = FuturesUnordered::new();
        for (target, channel) in targets.drain(..).zip(channels) {
            pumps.push(tokio::spawn(pump(target, channel, halt.clone())));
        }
        let mut pumps = pumps;
        self.status.set(State::Connected);
        tracing::info!(solution = %self.solution, connection = %self.id, address = %self.compiled.endpoint.address(), "bridge connected");

        let mut waiting: InOrder<(usize, u64)> = InOrder::default();
        // Answers being published, and requeues waiting out their delay, before they settle.
        let mut settling: FuturesUnordered<BoxFuture<Result<(usize, Settlement), Failure>>> =
            FuturesUnordered::new();
        let mut failure: Option<Failure> = None;
        let mut stopping = false;
        loop {
            tokio::select! {
                () = crate::bridge::until_set(stop), if !stopping => {
                    stopping = true;
                    // Stop consuming (nothing new is delivered), settle what is under way,
                    // then close: whatever was delivered and not settled comes again.
                    for (channel, tag) in &consumer_tags {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            channel.basic_cancel(tag.as_str().into(), lapin::options::BasicCancelOptions::default()),
                        )
                        .await;
                    }
                    consumers = SelectAll::new();
                }
                consumed = consumers.next(), if !consumers.is_empty() && !stopping => {
                    match consumed {
                        Some((index, Ok(delivery))) => {
                            let Some(source) = self.sources.get(index) else { continue };
                            let lapin::message::Delivery { data, properties, delivery_tag, .. } = delivery;
                            let inbound = inbound(source, &data, &properties);
                            match source.handle(&inbound) {
                                Step::Done(handled) => {
                                    if let Some(later) = settle(&settlers, &replies, index, delivery_tag, handled, self.status) {
                                        settling.push(later);
                                    }
                                }
                                Step::Wait(wait) => waiting.push(wait, (index, delivery_tag)),
                            }
                        }
                        Some((_, Err(e))) => { failure = Some(format!("consumer: {e}")); break; }
                        None => { failure = Some("the broker ended the consumers".into()); break; }
                    }
                }
                settled = waiting.settled(), if !waiting.is_empty() => {
                    for (handled, (index, tag)) in settled {
                        if let Some(later) = settle(&settlers, &replies, index, tag, handled, self.status) {
                            settling.push(later);
                        }
                    }
                }
                Some(settled) = settling.next(), if !settling.is_empty() => {
                    match settled {
                        Ok((index, settlement)) => {
                            if let Some(settler) = settlers.get(index) {
                                let _ = settler.send(settlement);
                            }
                        }
                        Err(e) => { failure = Some(e); break; }
                    }
                }
                Some(ended) = settler_tasks.next(), if !settler_tasks.is_empty() => {
                    let why = match ended {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => "a settler ended".to_owned(),
                        Err(e) => format!("a settler task ended: {e}"),
                    };
                    failure = Some(why);
                    break;
                }
                Some(ended) = pumps.next(), if !pumps.is_empty() => {
                    match ended {
                        Ok((target, result)) => {
                            targets.push(target);
                            if let Err(e) = result { failure = Some(e); break; }
                        }
                        Err(e) => { failure = Some(format!("a target task ended: {e}")); break; }
                    }
                }
                () = connection_lost(connection) => {
                    failure = Some("the connection to the broker was lost".into());
                    break;
                }
            }
            if stopping && waiting.is_empty() && settling.is_empty() {
                break;
            }
        }
        // The settlers send what they were given (the last acknowledgements) and end.
        drop(settlers);
        let flushed = tokio::time::timeout(NETWORK_TIMEOUT, async {
            while settler_tasks.next().await.is_some() {}
        })
        .await;
        if flushed.is_err() {
            tracing::warn!(connection = %self.id, "acknowledgements not sent in time; the broker delivers those messages again");
        }
        // Halt the pumps and take their targets back (their unconfirmed messages stay).
        let _ = halt_tx.send(true);
        let halted = tokio::time::timeout(NETWORK_TIMEOUT + Duration::from_secs(5), async {
            while let Some(ended) = pumps.next().await {
                if let Ok((target, _)) = ended {
                    targets.push(target);
                }
            }
        })
        .await;
        if halted.is_err() {
            tracing::warn!(connection = %self.id, "a target did not halt in time; its buffer is lost");
        }
        // Writes still waiting complete in the background: their events go out; their
        // messages were not settled and come again.
        waiting.finish_in_background();
        Ok((targets, failure.map_or(Ok(()), Err)))
    }
}

/// Resolves when lapin says the connection is no longer usable.
async fn connection_lost(connection: &Connection) {
    loop {
        if !connection.status().connected() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The consumed message as `inbound` takes it.
fn inbound<'a>(
    source: &SourceRuntime,
    data: &'a [u8],
    properties: &BasicProperties,
) -> Inbound<'a> {
    let mut headers = Vec::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            if let Some(text) = crate::amqp::mapping::header_text(value) {
                headers.push((name.as_str().to_ascii_lowercase(), text));
            }
        }
    }
    if let Some(id) = properties.correlation_id() {
        headers.push(("correlation-id".into(), id.as_str().to_owned()));
    }
    if let Some(to) = properties.reply_to() {
        headers.push(("reply-to".into(), to.as_str().to_owned()));
    }
    source.map_headers(&mut headers);
    let reply_to = headers
        .iter()
        .find(|(k, _)| k == "reply-to")
        .map(|(_, v)| v.clone());
    let correlation = headers
        .iter()
        .find(|(k, _)| k == "correlation-id")
        .map(|(_, v)| bytes::Bytes::from(v.clone().into_bytes()));
    Inbound {
        payload: data,
        headers,
        reply_to,
        correlation,
    }
}

/// How a delivery of a source's channel is settled, by its delivery tag.
#[derive(Debug, Clone, Copy)]
enum Settlement {
    Ack(u64),
    Reject(u64),
    Requeue(u64),
}

impl Settlement {
    fn of(settle: Settle, tag: u64) -> Self {
        match settle {
            Settle::Ack => Settlement::Ack(tag),
            Settle::Reject => Settlement::Reject(tag),
            Settle::Requeue => Settlement::Requeue(tag),
        }
    }
}

/// Settles a handled delivery: at once through its channel's settler, or — when an answer must
/// go to `reply-to` first, or a requeue waits out [`REQUEUE_DELAY`] — the future that does that
/// and then yields the settlement for the settler.
fn settle(
    settlers: &[mpsc::UnboundedSender<Settlement>],
    replies: &Channel,
    index: usize,
    tag: u64,
    handled: Handled,
    status: &Arc<Status>,
) -> Option<BoxFuture<Result<(usize, Settlement), Failure>>> {
    let settlement = Settlement::of(handled.settle, tag);
    let Some(reply) = handled.reply else {
        if handled.settle == Settle::Requeue {
            return Some(Box::pin(async move {
                tokio::time::sleep(REQUEUE_DELAY).await;
                Ok((index, settlement))
            }));
        }
        if let Some(settler) = settlers.get(index) {
            let _ = settler.send(settlement);
        }
        return None;
    };
    let replies = replies.clone();
    let status = status.clone();
    Some(Box::pin(async move {
        let mut properties = BasicProperties::default()
            .with_content_type("application/vnd.eclipse.ditto+json".into());
        if let Some(correlation) = reply
            .correlation
            .as_deref()
            .and_then(|c| std::str::from_utf8(c).ok())
        {
            properties = properties.with_correlation_id(correlation.into());
        }
        if let Some(code) = reply.status {
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from("status"),
                AMQPValue::LongUInt(u32::from(code)),
            );
            properties = properties.with_headers(headers);
        }
        bounded(
            "publish an answer",
            replies.basic_publish(
                "".into(),
                reply.to.as_str().into(),
                BasicPublishOptions::default(),
                &reply.payload,
                properties,
            ),
        )
        .await?;
        status.replies.fetch_add(1, Ordering::Relaxed);
        if handled.settle == Settle::Requeue {
            tokio::time::sleep(REQUEUE_DELAY).await;
        }
        Ok((index, settlement))
    }))
}

/// Settles one source channel's deliveries in the order they are given: rejects and requeues
/// at once, acknowledgements batched — one `basic.ack` with `multiple` up to the end of the
/// settled prefix of delivery tags (a channel's tags count from 1 without gaps), which spares
/// a frame and a wake-up of lapin's I/O thread per message. A delivery still under way holds
/// the prefix; when the acknowledgements waiting behind it reach half the prefetch window they
/// are sent one by one, so a slow command never stalls the channel. Ends when every sender is
/// gone, after sending what it was given.
async fn settler(
    channel: Channel,
    mut given: mpsc::UnboundedReceiver<Settlement>,
    window: usize,
) -> Result<(), Failure> {
    // Settled tags above the prefix: whether their frame was sent already.
    let mut settled: std::collections::BTreeMap<u64, bool> = std::collections::BTreeMap::new();
    let mut next: u64 = 1;
    let mut batch = Vec::new();
    while given.recv_many(&mut batch, 1024).await > 0 {
        for settlement in batch.drain(..) {
            match settlement {
                Settlement::Ack(tag) => {
                    settled.insert(tag, false);
                }
                Settlement::Reject(tag) => {
                    bounded(
                        "basic.reject",
                        channel.basic_reject(tag, BasicRejectOptions { requeue: false }),
                    )
                    .await?;
                    settled.insert(tag, true);
                }
                Settlement::Requeue(tag) => {
                    bounded(
                        "basic.nack",
                        channel.basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            },
                        ),
                    )
                    .await?;
                    settled.insert(tag, true);
                }
            }
        }
        let mut last_unsent = None;
        while let Some(sent) = settled.remove(&next) {
            if !sent {
                last_unsent = Some(next);
            }
            next += 1;
        }
        if let Some(tag) = last_unsent {
            bounded(
                "basic.ack",
                channel.basic_ack(tag, BasicAckOptions { multiple: true }),
            )
            .await?;
        }
        if settled.len() >= (window / 2).max(1) {
            for (tag, sent) in settled.iter_mut() {
                if !*sent {
                    bounded(
                        "basic.ack",
                        channel.basic_ack(*tag, BasicAckOptions { multiple: false }),
                    )
                    .await?;
                    *sent = true;
                }
            }
        }
    }
    Ok(())
}

/// Publishes a target's buffer with confirms until halted or failed; gives the target back.
async fn pump(
    mut target: TargetRuntime,
    channel: Channel,
    mut halt: watch::Receiver<bool>,
) -> (TargetRuntime, Result<(), Failure>) {
    loop {
        target.fill();
        if target.is_empty() {
            tokio::select! {
                () = target.wait() => continue,
                () = crate::bridge::until_set(&mut halt) => return (target, Ok(())),
            }
        }
        if *halt.borrow() {
            return (target, Ok(()));
        }
        let exchange = target.target().exchange.clone();
        let mut confirms = Vec::new();
        let batch: Vec<_> = target.pending().take(CONFIRM_BATCH).cloned().collect();
        for message in &batch {
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if let Some(content_type) = &message.content_type {
                properties = properties.with_content_type(content_type.as_str().into());
            }
            if !message.headers.is_empty() {
                let mut headers = FieldTable::default();
                for (name, value) in &message.headers {
                    headers.insert(
                        name.as_str().into(),
                        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
                    );
                }
                properties = properties.with_headers(headers);
            }
            let published = bounded(
                "publish to a target",
                channel.basic_publish(
                    exchange.as_str().into(),
                    message.address.as_str().into(),
                    BasicPublishOptions::default(),
                    &message.payload,
                    properties,
                ),
            )
            .await;
            match published {
                Ok(confirm) => confirms.push(confirm),
                Err(e) => return (target, Err(e)),
            }
        }
        let mut settled = 0;
        for confirm in confirms {
            match bounded("a publisher confirm", confirm).await {
                Ok(confirmation) if confirmation.is_nack() => {
                    // The broker could not take it; counted, not retried forever.
                    tracing::warn!("a target's broker refused a message (basic.nack)");
                    target.refused();
                    settled += 1;
                }
                Ok(_) => settled += 1,
                Err(e) => {
                    target.confirmed(settled);
                    return (target, Err(e));
                }
            }
        }
        target.confirmed(settled);
    }
}
