//! The `mailbox.v1.Events` gRPC service: rules, listings, leases and
//! answers, replay and discard.
//!
//! Every change is a command in the DC log (see `mailbox_state::events`),
//! proposed from whichever node the client reached; reads come from this
//! node's applied state. A subscription is a loop on the serving node that
//! leases due events for its consumer, never more than the consumer's
//! in-flight cap unanswered, and sleeps on the applied index (new events,
//! answers) or the next due time in between.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use mailbox_proto::v1 as pb;
use mailbox_proto::v1::events_server::Events;
use mailbox_raft::RaftNode;
use mailbox_state::events::{self as ev, EventAck};
use mailbox_state::{Command, CommandResult, KvRead};
use mailbox_types::{now_ms, validate_event_name, EventId, EventStatus, MessageId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert::{event_info, rule_from, rule_info};
use crate::EventsError;

/// Default in-flight cap of a subscription.
pub const DEFAULT_IN_FLIGHT: u32 = 16;
/// Largest in-flight cap a subscription may ask for.
pub const MAX_IN_FLIGHT: u32 = 1000;
/// Longest long poll of a lease request.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Largest page of a listing.
pub const MAX_PAGE: u32 = 1000;

/// The events API of one node.
#[derive(Clone)]
pub struct EventsService {
    raft: RaftNode,
}

fn seed() -> u64 {
    rand::random()
}

/// A DC held after an outage (see `events::check_caught_up`).
fn catching_up(dcs: &str, until_ms: i64) -> EventsError {
    EventsError::Unavailable {
        reason: format!(
            "this DC was out of action until recently and has not yet heard from DC(s) {dcs} since \
             (one may have taken its queues over): no leases, replays or discards until it has, \
             {} s at most; retry",
            (until_ms - now_ms()).max(0) / 1000 + 1
        ),
    }
}

fn parse_event_id(s: &str) -> Result<EventId, EventsError> {
    Ok(s.parse()?)
}

fn parse_event_ids(ids: &[String]) -> Result<Vec<EventId>, EventsError> {
    ids.iter().map(|s| parse_event_id(s)).collect()
}

/// Longest consumer name.
pub const MAX_CONSUMER_NAME: usize = 128;
/// The leader proposes a lease expiry at least this often, due or not:
/// well inside `LATE_EXPIRY_MS`, so a DC that can act never shows a gap.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// A consumer name: 1..=128 bytes, no control characters (it is shown in
/// every attempt and keys the consumer's last lease request).
pub fn validate_consumer(c: &str) -> Result<(), EventsError> {
    if c.is_empty() || c.len() > MAX_CONSUMER_NAME || c.chars().any(char::is_control) {
        return Err(EventsError::invalid(format!(
            "consumer name {c:?}: 1 to {MAX_CONSUMER_NAME} bytes, no control characters"
        )));
    }
    Ok(())
}

impl EventsService {
    /// The service over this node's DC log.
    pub fn new(raft: RaftNode) -> Self {
        Self { raft }
    }

    pub(crate) fn view(&self) -> &dyn KvRead {
        self.raft.view()
    }

    async fn write(&self, cmd: Command) -> Result<CommandResult, EventsError> {
        Ok(self.raft.propose(cmd).await??)
    }

    /// Whether something in `queue` is due now (an event to deliver or a
    /// lease that ran out).
    fn due_now(&self, queue: &str) -> Result<Option<i64>, EventsError> {
        // A queue another DC took over: the consumer is told where to go
        // (rather than waiting here for what never comes).
        ev::check_queue_here(self.view(), self.raft.dc(), queue)?;
        // Within the next second: callers nap at most that long anyway.
        Ok(ev::next_due(
            self.view(),
            self.raft.dc(),
            queue,
            now_ms().saturating_add(1_000),
        )?)
    }

    /// Waits until something in `queue` is due, at most `for_at_most`;
    /// whether it is.
    async fn wait_due(&self, queue: &str, for_at_most: Duration) -> Result<bool, EventsError> {
        let until = tokio::time::Instant::now() + for_at_most;
        let mut applied = self.raft.applied_watch();
        loop {
            let now = now_ms();
            let next = self.due_now(queue)?;
            if next.is_some_and(|d| d <= now) {
                return Ok(true);
            }
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // Nothing due within a second: look again in a second (what
            // is due later is not read, see `next_due`).
            let nap = next
                .map(|d| Duration::from_millis((d - now).max(1) as u64))
                .unwrap_or(Duration::from_secs(1))
                .min(left);
            tokio::select! {
                r = applied.changed() => if r.is_err() { return Ok(false) },
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Refuses while this DC is held after an outage (see
    /// `events::check_caught_up`): a queue it handled may have been taken
    /// over meanwhile, and a lease, a replay or a discard made before it
    /// reads that would override what the new handler did.
    fn check_held(&self) -> Result<(), EventsError> {
        match ev::catching_up(self.view(), self.raft.dc(), now_ms())? {
            Some((dcs, until_ms)) => Err(catching_up(&dcs, until_ms)),
            None => Ok(()),
        }
    }

    /// One lease request; `request` identifies it, so that a retry of it
    /// after an unknown outcome gets what the first attempt leased.
    async fn lease(
        &self,
        queue: &str,
        consumer: &str,
        max: u32,
        lease_ms: Option<u64>,
        request: u64,
    ) -> Result<Vec<mailbox_types::Event>, EventsError> {
        // Said at once, without a proposal that would only be answered
        // the same (subscriptions retry often).
        self.check_held()?;
        match self
            .write(Command::LeaseEvents {
                queue: queue.to_string(),
                consumer: consumer.to_string(),
                max,
                lease_ms,
                now_ms: now_ms(),
                seed: seed(),
                request,
            })
            .await?
        {
            CommandResult::Leased { events } => Ok(events),
            CommandResult::CatchingUp { dcs, until_ms } => Err(catching_up(&dcs, until_ms)),
            other => Err(EventsError::Internal {
                reason: format!("unexpected result of a lease: {other:?}"),
            }),
        }
    }

    /// Leases up to `max` due events of `queue`, waiting up to `wait`
    /// (at most [`MAX_WAIT`]) for one when none is due: the long poll of
    /// the gRPC `Lease` and of the HTTP API.
    pub async fn lease_wait(
        &self,
        queue: &str,
        consumer: &str,
        max: u32,
        lease_ms: Option<u64>,
        wait: Duration,
    ) -> Result<Vec<mailbox_types::Event>, EventsError> {
        validate_event_name("queue name", queue)?;
        validate_consumer(consumer)?;
        if let Some(ms) = lease_ms {
            if !(1_000..=mailbox_types::event::MAX_LEASE_MS).contains(&ms) {
                return Err(EventsError::invalid("lease must be within 1s..=12h"));
            }
        }
        let max = max.clamp(1, ev::MAX_LEASE_BATCH);
        ev::check_queue_here(self.view(), self.raft.dc(), queue)?;
        let until = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let events = self.lease(queue, consumer, max, lease_ms, seed()).await?;
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if !events.is_empty() || left.is_zero() {
                return Ok(events);
            }
            if !self.wait_due(queue, left).await? {
                return Ok(Vec::new());
            }
        }
    }

    /// Answers delivery `attempt` of event `id`: `complete`, `retry`
    /// (`delay_ms` instead of the backoff), `fail` (a reason is required)
    /// or `progress` (`delay_ms`: the new lease, default the rule's).
    pub async fn answer(
        &self,
        id: EventId,
        attempt: u32,
        consumer: &str,
        outcome: &str,
        reason: String,
        delay_ms: Option<u64>,
    ) -> Result<mailbox_types::Event, EventsError> {
        let ack = match outcome {
            "complete" => EventAck::Complete,
            "retry" => EventAck::Retry { delay_ms, reason },
            "fail" => {
                if reason.trim().is_empty() {
                    return Err(EventsError::invalid("fail needs a reason"));
                }
                EventAck::Fail { reason }
            }
            "progress" => EventAck::Progress {
                lease_ms: delay_ms.filter(|d| *d > 0),
            },
            other => {
                return Err(EventsError::invalid(format!(
                    "outcome {other:?}: use complete, retry, fail or progress"
                )))
            }
        };
        match self
            .write(Command::AckEvent {
                id,
                attempt,
                consumer: consumer.to_string(),
                ack,
                now_ms: now_ms(),
                seed: seed(),
            })
            .await?
        {
            CommandResult::EventUpdated { event } => {
                if event.status == EventStatus::Failed {
                    let last = event
                        .attempts
                        .last()
                        .map(|a| a.error.as_str())
                        .unwrap_or("");
                    tracing::warn!(
                        event = %event.id,
                        queue = %event.queue,
                        rule = %event.rule,
                        message = %event.message.id,
                        mailbox = %event.message.mailbox,
                        attempts = event.deliveries,
                        error = %last,
                        "event dead-lettered"
                    );
                }
                Ok(*event)
            }
            other => Err(EventsError::Internal {
                reason: format!("unexpected result of an answer: {other:?}"),
            }),
        }
    }

    /// One event.
    pub fn event(&self, id: &EventId) -> Result<mailbox_types::Event, EventsError> {
        ev::get_event(self.view(), id)?.ok_or_else(|| EventsError::NotFound {
            what: format!("event {id}"),
        })
    }

    fn changed(r: CommandResult) -> Result<pb::ChangeEventsResponse, EventsError> {
        match r {
            CommandResult::EventsChanged { changed, refused } => Ok(pb::ChangeEventsResponse {
                changed: changed.iter().map(ToString::to_string).collect(),
                refused: refused
                    .into_iter()
                    .map(|(id, reason)| pb::RefusedEvent {
                        id: id.to_string(),
                        reason,
                    })
                    .collect(),
            }),
            other => Err(EventsError::Internal {
                reason: format!("unexpected result: {other:?}"),
            }),
        }
    }

    fn list(&self, req: &pb::ListEventsRequest) -> Result<pb::ListEventsResponse, EventsError> {
        let status = match req.status.as_str() {
            "" => None,
            s => Some(s.parse::<EventStatus>()?),
        };
        let limit = match req.limit {
            0 => 100,
            n => n.min(MAX_PAGE),
        } as usize;
        let keep = |e: &mailbox_types::Event| {
            (req.queue.is_empty() || e.queue == req.queue)
                && status.is_none_or(|s| e.status == s)
                && (req.rule.is_empty() || e.rule == req.rule)
                && (req.mailbox.is_empty() || e.message.mailbox.as_str() == req.mailbox)
                && (req.since_ms == 0 || e.updated_ms >= req.since_ms)
                && (req.until_ms == 0 || e.updated_ms <= req.until_ms)
                && (req.error_contains.is_empty()
                    || e.attempts
                        .iter()
                        .any(|a| a.error.contains(&req.error_contains)))
        };
        if !req.message_id.is_empty() {
            let id: MessageId = req.message_id.parse()?;
            let events: Vec<_> = ev::events_of_message(self.view(), &id)?;
            let mut pending = Vec::new();
            if let Some(meta) = mailbox_state::get_message(self.view(), &id)? {
                let complete = mailbox_state::replication::complete_ms(self.view(), &id)?;
                if complete.is_none() {
                    for (rule, _) in ev::list_rules(self.view())? {
                        if rule.enabled
                            && rule.matches(&meta)
                            && !events.iter().any(|e| e.rule == rule.name)
                        {
                            pending.push(rule.name);
                        }
                    }
                }
            }
            return Ok(pb::ListEventsResponse {
                events: events.iter().filter(|e| keep(e)).map(event_info).collect(),
                next_after: String::new(),
                pending_replication_rules: pending,
            });
        }
        let queue = (!req.queue.is_empty()).then_some(req.queue.as_str());
        if let Some(q) = queue {
            validate_event_name("queue name", q)?;
        }
        let mut after = if req.after.is_empty() {
            None
        } else {
            Some(
                hex::decode(&req.after)
                    .ok()
                    .ok_or_else(|| EventsError::invalid("bad `after` position"))?,
            )
        };
        let mut out = Vec::new();
        // Filters beyond queue and status apply after the index: read on,
        // a bounded number of pages, until the page is full.
        for _ in 0..64 {
            let (page, next) =
                ev::list_events(self.view(), queue, status, after.as_deref(), limit)?;
            out.extend(page.iter().filter(|e| keep(e)).map(event_info));
            after = next;
            if out.len() >= limit || after.is_none() {
                break;
            }
        }
        out.truncate(limit);
        Ok(pb::ListEventsResponse {
            events: out,
            next_after: after.map(hex::encode).unwrap_or_default(),
            pending_replication_rules: Vec::new(),
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::EventInfo, Status>> + Send>>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::EvaluateRuleProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Events for EventsService {
    #[tracing::instrument(level = "info", skip_all, fields(rule = %req.get_ref().rule.as_ref().map(|r| r.name.as_str()).unwrap_or("")))]
    async fn put_rule(
        &self,
        req: Request<pb::PutRuleRequest>,
    ) -> Result<Response<pb::PutRuleResponse>, Status> {
        let mut rule = req
            .into_inner()
            .rule
            .ok_or_else(|| EventsError::invalid("no rule given"))?;
        // Secrets are never read back: a rule changed from a listing
        // (enable, disable) keeps the ones it has for the same URL.
        if !rule.webhook_url.is_empty() && rule.webhook_secrets.is_empty() {
            if let Some(old) = ev::get_rule(self.view(), &rule.name)
                .map_err(EventsError::from)?
                .and_then(|r| r.webhook)
                .filter(|w| w.url == rule.webhook_url)
            {
                rule.webhook_secrets = old.secrets;
            }
        }
        let rule = rule_from(rule)?;
        let name = rule.name.clone();
        self.write(Command::PutRule {
            rule,
            wall_ms: now_ms(),
        })
        .await?;
        let stored = ev::list_rules(self.view())
            .map_err(EventsError::from)?
            .into_iter()
            .find(|(r, _)| r.name == name);
        Ok(Response::new(pb::PutRuleResponse {
            rule: stored.map(|(r, s)| rule_info(&r, Some(&s))),
        }))
    }

    #[tracing::instrument(level = "info", skip_all, fields(rule = %req.get_ref().name))]
    async fn delete_rule(
        &self,
        req: Request<pb::DeleteRuleRequest>,
    ) -> Result<Response<pb::DeleteRuleResponse>, Status> {
        let name = req.into_inner().name;
        validate_event_name("rule name", &name).map_err(EventsError::from)?;
        self.write(Command::DeleteRule {
            name,
            wall_ms: now_ms(),
        })
        .await?;
        Ok(Response::new(pb::DeleteRuleResponse {}))
    }

    async fn list_rules(
        &self,
        _req: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        let rules = ev::list_rules(self.view()).map_err(EventsError::from)?;
        Ok(Response::new(pb::ListRulesResponse {
            rules: rules.iter().map(|(r, s)| rule_info(r, Some(s))).collect(),
        }))
    }

    type EvaluateRuleStream = ProgressStream;

    #[tracing::instrument(level = "info", skip_all, fields(rule = %req.get_ref().name))]
    async fn evaluate_rule(
        &self,
        req: Request<pb::EvaluateRuleRequest>,
    ) -> Result<Response<Self::EvaluateRuleStream>, Status> {
        let req = req.into_inner();
        validate_event_name("rule name", &req.name).map_err(EventsError::from)?;
        if ev::get_rule(self.view(), &req.name)
            .map_err(EventsError::from)?
            .is_none()
        {
            return Err(EventsError::NotFound {
                what: format!("rule {}", req.name),
            }
            .into());
        }
        let page = match req.page {
            0 => 1000,
            n => n.min(ev::MAX_EVALUATE_BATCH),
        };
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let (mut scanned, mut added, mut after) = (0u64, 0u64, None);
            loop {
                let r = this
                    .write(Command::EvaluateRule {
                        name: req.name.clone(),
                        after,
                        limit: page,
                        now_ms: now_ms(),
                    })
                    .await;
                let (s, a, next) = match r {
                    Ok(CommandResult::Evaluated {
                        scanned,
                        added,
                        next,
                    }) => (scanned, added, next),
                    Ok(other) => {
                        let e = EventsError::Internal {
                            reason: format!("unexpected result of an evaluation: {other:?}"),
                        };
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                scanned += s;
                added += a;
                after = next;
                let done = after.is_none();
                let progress = pb::EvaluateRuleProgress {
                    scanned,
                    added,
                    done,
                };
                if tx.send(Ok(progress)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        Ok(Response::new(self.list(req.get_ref())?))
    }

    async fn get_event(
        &self,
        req: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::EventInfo>, Status> {
        let id = parse_event_id(&req.get_ref().id)?;
        match ev::get_event(self.view(), &id).map_err(EventsError::from)? {
            Some(e) => Ok(Response::new(event_info(&e))),
            None => Err(EventsError::NotFound {
                what: format!("event {id}"),
            }
            .into()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(queue = %req.get_ref().queue))]
    async fn lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let req = req.into_inner();
        validate_event_name("queue name", &req.queue).map_err(EventsError::from)?;
        let lease_ms = (req.lease_ms > 0).then_some(req.lease_ms);
        if let Some(ms) = lease_ms {
            if !(1_000..=mailbox_types::event::MAX_LEASE_MS).contains(&ms) {
                return Err(EventsError::invalid("lease must be within 1s..=12h").into());
            }
        }
        let events = self
            .lease_wait(
                &req.queue,
                &req.consumer,
                req.max,
                lease_ms,
                Duration::from_millis(req.wait_ms),
            )
            .await?;
        Ok(Response::new(pb::LeaseResponse {
            events: events.iter().map(event_info).collect(),
        }))
    }

    type SubscribeStream = EventStream;

    #[tracing::instrument(level = "info", skip_all, fields(queue = %req.get_ref().queue, consumer = %req.get_ref().consumer))]
    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = req.into_inner();
        validate_event_name("queue name", &req.queue).map_err(EventsError::from)?;
        let cap = match req.max_in_flight {
            0 => DEFAULT_IN_FLIGHT,
            n => n.min(MAX_IN_FLIGHT),
        } as usize;
        let lease_ms = (req.lease_ms > 0).then_some(req.lease_ms);
        if let Some(ms) = lease_ms {
            if !(1_000..=mailbox_types::event::MAX_LEASE_MS).contains(&ms) {
                return Err(EventsError::invalid("lease must be within 1s..=12h").into());
            }
        }
        validate_consumer(&req.consumer)?;
        let (tx, rx) = mpsc::channel(cap);
        let this = self.clone();
        tokio::spawn(async move {
            // Delivered and not answered yet (as far as this node has applied).
            let mut in_flight: HashMap<EventId, u32> = HashMap::new();
            let mut applied = this.raft.applied_watch();
            // The id of the lease request under way: kept across retries
            // of one request, new for the next.
            let mut request = seed();
            loop {
                // Which deliveries were answered is read only when the cap
                // is reached (one read each): under load this loop wakes
                // for every applied entry.
                if in_flight.len() >= cap {
                    in_flight.retain(|id, attempt| {
                        ev::get_event(this.view(), id)
                            .ok()
                            .flatten()
                            .is_some_and(|e| {
                                e.status == EventStatus::Processing && e.deliveries == *attempt
                            })
                    });
                }
                let room = cap.saturating_sub(in_flight.len());
                let due = room > 0
                    && match this.due_now(&req.queue) {
                        Ok(d) => d.is_some_and(|d| d <= now_ms()),
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    };
                if !due {
                    // Answers and new events arrive as applied entries; a
                    // backoff ends on the clock.
                    let nap = match this.due_now(&req.queue) {
                        Ok(Some(d)) => Duration::from_millis((d - now_ms()).clamp(1, 1000) as u64),
                        _ => Duration::from_secs(1),
                    };
                    tokio::select! {
                        _ = tx.closed() => return,
                        r = applied.changed() => {
                            if r.is_err() {
                                return;
                            }
                            // Entries apply in bursts: look once per burst.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        _ = tokio::time::sleep(nap) => {}
                    }
                    continue;
                }
                match this
                    .lease(&req.queue, &req.consumer, room as u32, lease_ms, request)
                    .await
                {
                    Ok(events) => {
                        request = seed();
                        for e in events {
                            in_flight.insert(e.id, e.deliveries);
                            if tx.send(Ok(event_info(&e))).await.is_err() {
                                // The consumer left: what it was given
                                // expires and is delivered again.
                                return;
                            }
                        }
                    }
                    Err(EventsError::Unavailable { reason }) => {
                        tracing::debug!("lease for a subscription: {reason}; retrying");
                        tokio::select! {
                            _ = tx.closed() => return,
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(id = %req.get_ref().id, attempt = req.get_ref().attempt))]
    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::EventInfo>, Status> {
        let req = req.into_inner();
        let id = parse_event_id(&req.id)?;
        let e = self
            .answer(
                id,
                req.attempt,
                &req.consumer,
                &req.outcome,
                req.reason,
                req.delay_ms,
            )
            .await?;
        Ok(Response::new(event_info(&e)))
    }

    #[tracing::instrument(level = "info", skip_all, fields(n = req.get_ref().ids.len()))]
    async fn replay(
        &self,
        req: Request<pb::ReplayRequest>,
    ) -> Result<Response<pb::ChangeEventsResponse>, Status> {
        let req = req.into_inner();
        let ids = parse_event_ids(&req.ids)?;
        self.check_held()?;
        let r = self
            .write(Command::ReplayEvents {
                ids,
                force: req.force,
                now_ms: now_ms(),
            })
            .await?;
        Ok(Response::new(Self::changed(r)?))
    }

    #[tracing::instrument(level = "info", skip_all, fields(n = req.get_ref().ids.len()))]
    async fn discard(
        &self,
        req: Request<pb::DiscardRequest>,
    ) -> Result<Response<pb::ChangeEventsResponse>, Status> {
        let req = req.into_inner();
        if req.reason.trim().is_empty() {
            return Err(EventsError::invalid("discard needs a reason (it is kept)").into());
        }
        let ids = parse_event_ids(&req.ids)?;
        self.check_held()?;
        let r = self
            .write(Command::DiscardEvents {
                ids,
                reason: req.reason,
                now_ms: now_ms(),
            })
            .await?;
        Ok(Response::new(Self::changed(r)?))
    }

    #[tracing::instrument(level = "info", skip_all, fields(dc = %req.get_ref().dc, suspended = req.get_ref().suspended))]
    async fn set_dc_suspension(
        &self,
        req: Request<pb::SetDcSuspensionRequest>,
    ) -> Result<Response<pb::ListDcsResponse>, Status> {
        let req = req.into_inner();
        if req.suspended && req.reason.trim().is_empty() {
            return Err(EventsError::invalid(
                "suspending a DC needs a reason (it is kept and shown)",
            )
            .into());
        }
        self.write(Command::SuspendDc {
            dc: req.dc.clone(),
            suspended: req.suspended,
            reason: req.reason,
            wall_ms: now_ms(),
        })
        .await?;
        tracing::warn!(
            dc = %req.dc,
            suspended = req.suspended,
            "DC completion suspension changed by an admin"
        );
        Ok(Response::new(self.dcs()?))
    }

    async fn list_dcs(
        &self,
        _req: Request<pb::ListDcsRequest>,
    ) -> Result<Response<pb::ListDcsResponse>, Status> {
        Ok(Response::new(self.dcs()?))
    }

    async fn queue_stats(
        &self,
        _req: Request<pb::QueueStatsRequest>,
    ) -> Result<Response<pb::QueueStatsResponse>, Status> {
        Ok(Response::new(self.stats()?))
    }

    #[tracing::instrument(level = "info", skip_all, fields(queue = %req.get_ref().queue, dc = %req.get_ref().dc))]
    async fn takeover_queue(
        &self,
        req: Request<pb::TakeoverQueueRequest>,
    ) -> Result<Response<pb::QueueStatsResponse>, Status> {
        let req = req.into_inner();
        let dc = match (req.release, req.dc.is_empty()) {
            (true, true) => None,
            (false, false) => Some(req.dc.clone()),
            (true, false) => {
                return Err(EventsError::invalid("release hands the queue back: name no DC").into())
            }
            (false, true) => {
                return Err(EventsError::invalid("name the DC that takes the queue over").into())
            }
        };
        if dc.is_some() && req.reason.trim().is_empty() {
            return Err(
                EventsError::invalid("a takeover needs a reason (it is kept and shown)").into(),
            );
        }
        self.write(Command::TakeoverQueue {
            queue: req.queue.clone(),
            dc: dc.clone(),
            reason: req.reason,
            wall_ms: now_ms(),
            force: req.force,
        })
        .await?;
        tracing::warn!(
            queue = %req.queue,
            handled_by = dc.as_deref().unwrap_or("each event's origin DC"),
            "queue handed over by an admin"
        );
        Ok(Response::new(self.stats()?))
    }
}

impl EventsService {
    fn stats(&self) -> Result<pb::QueueStatsResponse, EventsError> {
        let queues = ev::queue_counts(self.view())?;
        // (The effective owner: one that left the cluster counts as none.)
        let handler = |q: &str| ev::queue_handler(self.view(), q).map(Option::unwrap_or_default);
        let owners = ev::queue_owners(self.view())?;
        let mut out: Vec<pb::QueueStats> = queues
            .into_iter()
            .map(|(queue, c)| {
                Ok(pb::QueueStats {
                    handled_by: handler(&queue)?,
                    queue,
                    raised: c.raised,
                    pending: c.pending,
                    processing: c.processing,
                    complete: c.complete,
                    failed: c.failed,
                    discarded: c.discarded,
                })
            })
            .collect::<Result<_, mailbox_state::StateError>>()?;
        // A queue taken over before any of its events reached this DC.
        for (queue, _) in owners {
            if !out.iter().any(|q| q.queue == queue) {
                out.push(pb::QueueStats {
                    handled_by: handler(&queue)?,
                    queue,
                    ..Default::default()
                });
            }
        }
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(pb::QueueStatsResponse { queues: out })
    }
}

impl EventsService {
    fn dcs(&self) -> Result<pb::ListDcsResponse, EventsError> {
        let configured =
            mailbox_state::replication::configured_dcs(self.view())?.unwrap_or_default();
        let regs: HashMap<String, mailbox_state::Suspension> =
            ev::suspensions(self.view())?.into_iter().collect();
        Ok(pb::ListDcsResponse {
            dcs: configured
                .into_iter()
                .map(|dc| {
                    let s = regs.get(&dc);
                    pb::DcInfo {
                        suspended: s.is_some_and(|s| s.suspended),
                        reason: s.map(|s| s.reason.clone()).unwrap_or_default(),
                        since_ms: s.map_or(0, |s| s.at_ms),
                        set_in_dc: s.map(|s| s.stamp.dc.clone()).unwrap_or_default(),
                        dc,
                    }
                })
                .collect(),
        })
    }
}

/// The leader's event housekeeping, about once a second: settles leases
/// that ran out (an abandoned event is retried or dead-lettered even when
/// no consumer asks for its queue), runs a due completion re-check (after
/// a DC was suspended or left) page by page, and purges events finished
/// longer than `retention` ago. All are proposals, so a deposed leader's
/// attempt simply does not commit, and what is due is recorded in the
/// state, so a new leader picks it up. Ends when `shutdown` flips to true.
pub async fn expire_leases(
    raft: RaftNode,
    retention: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // Every `HEARTBEAT`, whatever is due and whatever else housekeeping is
    // busy with (a long purge, a completion re-check): the DC's record of
    // when it could act (see `LATE_EXPIRY_MS`), so that only a DC that was
    // down or without a quorum shows a gap, never one that was idle.
    {
        let (raft, mut shutdown) = (raft.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                }
                if *shutdown.borrow() {
                    return;
                }
                if raft.is_leader() {
                    let r = raft
                        .propose(Command::ExpireLeases {
                            now_ms: now_ms(),
                            seed: seed(),
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::debug!("housekeeping heartbeat: {e}");
                    }
                }
            }
        });
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if !raft.is_leader() {
            continue;
        }
        // Oldest first, a bounded number per entry; again at once while
        // more are due (a burst of abandoned leases clears in one tick).
        loop {
            let due = match ev::earliest_lease_end(raft.view(), raft.dc(), now_ms() + 1) {
                Ok(d) => d.is_some(),
                Err(e) => {
                    tracing::warn!("reading running leases: {e}");
                    break;
                }
            };
            if !due || !raft.is_leader() {
                break;
            }
            match raft
                .propose(Command::ExpireLeases {
                    now_ms: now_ms(),
                    seed: seed(),
                })
                .await
            {
                Ok(Ok(CommandResult::Expired { count, more })) => {
                    if count > 0 {
                        tracing::info!(
                            count,
                            "leases ran out without an answer: retried or dead-lettered"
                        );
                    }
                    if !more {
                        break;
                    }
                }
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    tracing::warn!("settling expired leases: {e}");
                    break;
                }
                Err(e) => {
                    tracing::debug!("settling expired leases: {e}");
                    break;
                }
            }
        }
        purge_finished(&raft, retention).await;
        announce(&raft).await;
        let mut pages = 0u64;
        while raft.is_leader()
            && mailbox_state::replication::recheck_due(raft.view()).unwrap_or(false)
        {
            match raft
                .propose(Command::RecheckCompletion { now_ms: now_ms() })
                .await
            {
                Ok(Ok(CommandResult::Expired { more, .. })) => {
                    pages += 1;
                    if !more {
                        tracing::info!(pages, "completion re-check done");
                        break;
                    }
                }
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    tracing::warn!("completion re-check: {e}");
                    break;
                }
                Err(e) => {
                    tracing::debug!("completion re-check: {e}");
                    break;
                }
            }
        }
    }
}

/// Purges events finished before now minus `retention`, page by page.
async fn purge_finished(raft: &RaftNode, retention: Duration) {
    let mut purged = 0u64;
    loop {
        let before_ms = now_ms().saturating_sub(retention.as_millis() as i64);
        let due = ev::oldest_finished(raft.view())
            .ok()
            .flatten()
            .is_some_and(|t| t < before_ms);
        if !due || !raft.is_leader() {
            break;
        }
        match raft.propose(Command::PurgeEvents { before_ms }).await {
            Ok(Ok(CommandResult::Expired { count, more })) => {
                purged += count;
                if !more {
                    break;
                }
            }
            Ok(Ok(_)) => break,
            Ok(Err(e)) => {
                tracing::warn!("purging finished events: {e}");
                break;
            }
            Err(e) => {
                tracing::debug!("purging finished events: {e}");
                break;
            }
        }
    }
    if purged > 0 {
        tracing::info!(
            purged,
            retention_s = retention.as_secs(),
            "finished events purged after the retention"
        );
    }
}

/// Re-announces the events of queues whose owner changed, one page per
/// queue per tick (so the other housekeeping goes on meanwhile).
async fn announce(raft: &RaftNode) {
    for queue in ev::announcements_due(raft.view()).unwrap_or_default() {
        if !raft.is_leader() {
            return;
        }
        match raft
            .propose(Command::AnnounceQueue {
                queue: queue.clone(),
            })
            .await
        {
            Ok(Ok(CommandResult::Expired { count, more })) => {
                tracing::debug!(%queue, count, more, "queue's events sent to every DC again");
                if !more {
                    tracing::info!(%queue, "queue's events re-announced after its owner changed");
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(%queue, "re-announcing events: {e}"),
            Err(e) => tracing::debug!(%queue, "re-announcing events: {e}"),
        }
    }
}
