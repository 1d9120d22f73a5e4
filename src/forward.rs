//! What a session's send task forwards: any number of hub subscriptions,
//! each under its own hub's policy, taken in turn so that no busy hub
//! starves the others.

use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::LagNotice;
use crate::hub::{RecvError, Subscription, TryRecvError};
use crate::message::Message;
use crate::metrics::Recorder;
use crate::policy::Policy;

/// Identifies one forwarded subscription within its session, to stop it.
pub(crate) type ForwardKey = u64;

/// A subscription handed to the send task, with what it must write first.
pub(crate) struct NewForward {
    pub(crate) sub: Subscription,
    pub(crate) key: ForwardKey,
    /// For a topic: the messages to write before the subscription's own
    /// (a gap notice, the replay or the history a resume recovers), and the
    /// position they bring the client to.
    pub(crate) topic: Option<TopicStart>,
}

/// Where a topic subscription starts.
pub(crate) struct TopicStart {
    pub(crate) backlog: VecDeque<Message>,
    /// The sequence number the client has once the backlog is written:
    /// live messages up to it are already in the backlog, or were before
    /// the client's position.
    pub(crate) seq: u64,
}

/// A hub subscription being forwarded, with its policy.
pub(crate) struct Forwarding {
    pub(crate) sub: Subscription,
    pub(crate) key: ForwardKey,
    pub(crate) policy: Policy,
    pub(crate) lag_notice: Option<LagNotice>,
    /// Under [`Policy::Suspend`], the watch on this subscriber holding the
    /// hub's buffer full.
    stall: Option<Stall>,
    /// The hub's delivery latency, when it is registered for metrics.
    pub(crate) latency: Option<Box<Recorder>>,
    /// A topic's position and backlog: boxed, as a plain hub has none.
    topic: Option<Box<TopicState>>,
}

struct TopicState {
    backlog: VecDeque<Message>,
    /// The last sequence number the client has (written, or before its
    /// position).
    seq: u64,
}

/// One thing to write for a forwarded subscription.
pub(crate) enum Item {
    /// From the hub: a message, or a report that some were skipped.
    Live(Result<Message, RecvError>),
    /// Written before the hub's own: not timed, not a policy matter.
    Backlog(Message),
}

/// How long a subscriber has kept a `Suspend` hub's buffer full.
struct Stall {
    timeout: Duration,
    /// A write had to wait for the socket since the last look: only then
    /// can this subscriber be the slow one (one that never waits keeps up),
    /// so only then is the hub's shared count read.
    waited: bool,
    /// The first of a run of samples that found the buffer full because of
    /// this subscriber, with no quiet spell since.
    full_since: Option<Instant>,
    /// The last sample that found it full.
    last_full: Instant,
}

impl Forwarding {
    pub(crate) fn new(new: NewForward) -> Forwarding {
        let NewForward { sub, key, topic } = new;
        let config = sub.hub().config();
        Forwarding {
            key,
            policy: config.policy,
            lag_notice: config.lag_notice.clone(),
            stall: (config.policy == Policy::Suspend).then(|| Stall {
                timeout: config.stall_timeout,
                waited: false,
                full_since: None,
                last_full: Instant::now(),
            }),
            latency: sub
                .hub()
                .latency()
                .map(|latency| Box::new(Recorder::new(latency.clone()))),
            topic: topic.map(|start| {
                Box::new(TopicState {
                    backlog: start.backlog,
                    seq: start.seq,
                })
            }),
            sub,
        }
    }

    /// The next item if one is ready now.
    pub(crate) fn try_next(&mut self) -> Option<Item> {
        if let Some(msg) = self.topic.as_mut().and_then(|t| t.backlog.pop_front()) {
            return Some(Item::Backlog(msg));
        }
        loop {
            let result = match self.sub.try_recv() {
                Ok(msg) => Ok(msg),
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
                Err(TryRecvError::Empty) => return None,
            };
            if let Some(item) = self.sequence(result) {
                return Some(item);
            }
        }
    }

    /// Waits for the next item.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Item> {
        if let Some(msg) = self.topic.as_mut().and_then(|t| t.backlog.pop_front()) {
            return Poll::Ready(Item::Backlog(msg));
        }
        loop {
            let result = match futures_util::ready!(self.sub.poll_recv(cx)) {
                Some(result) => result,
                None => Err(RecvError::Closed),
            };
            if let Some(item) = self.sequence(result) {
                return Poll::Ready(item);
            }
        }
    }

    /// Keeps a topic's messages in order: one the client already has (in
    /// the backlog, or before its position) is skipped, and one that comes
    /// after a jump is preceded by a notice of exactly how many the client
    /// will never get. So a skip under [`Policy::DropOldest`] is reported by
    /// the sequence numbers, not by the channel's count (which includes
    /// presence events).
    fn sequence(&mut self, result: Result<Message, RecvError>) -> Option<Item> {
        let Some(topic) = self.topic.as_mut() else {
            return Some(Item::Live(result));
        };
        match result {
            Ok(msg) => {
                let seq = self.sub.seq();
                if seq == 0 {
                    // A presence event: not a message, not counted in seq.
                    return Some(Item::Live(Ok(msg)));
                }
                if seq <= topic.seq {
                    return None;
                }
                let missed = seq - topic.seq - 1;
                topic.seq = seq;
                if missed > 0 {
                    if let Some(notice) = self.lag_notice.as_ref() {
                        topic.backlog.push_back(msg);
                        return Some(Item::Backlog(notice(missed)));
                    }
                }
                Some(Item::Live(Ok(msg)))
            }
            // Under DropOldest the next message's seq tells the client
            // what it lost; under Disconnect the session closes.
            Err(RecvError::Lagged(_)) if self.policy != Policy::Disconnect => None,
            Err(err) => Some(Item::Live(Err(err))),
        }
    }

    /// Whether this subscriber has kept the buffer full (every publisher
    /// waiting on it) for the hub's `stall_timeout` while other subscribers
    /// kept up.
    ///
    /// A slow reader's backlog does not sit at the capacity: the kernel
    /// takes its bytes in bursts as the client frees its receive window, so
    /// the send task drains a burst of messages at once and the backlog
    /// swings between full and far from it. So the clock starts at a sample
    /// that finds the backlog full (within a sixteenth of the capacity:
    /// publishers refill each slot it frees, so a sample rarely sees it quite
    /// full) and runs on through later full samples; it stops only after a
    /// quiet spell of half the timeout with no full sample, which a client
    /// that keeps up has and one that is slower than the hub never does.
    /// When every subscriber is full, the publishers are faster than anyone
    /// reads (a burst, an overloaded machine): they wait, and nobody is
    /// blamed.
    pub(crate) fn stalled(&mut self) -> bool {
        let Some(stall) = self.stall.as_mut() else {
            return false;
        };
        if !std::mem::take(&mut stall.waited) && stall.full_since.is_none() {
            return false;
        }
        // The capacity now: the byte bound may hold it below the configured one.
        let capacity = self.sub.hub().capacity_now() as u64;
        let full = self.sub.backlog() >= capacity - capacity / 16;
        if !full && stall.full_since.is_none() {
            return false;
        }
        let now = Instant::now();
        if full {
            stall.last_full = now;
        } else if now.duration_since(stall.last_full) > stall.timeout / 2 {
            stall.full_since = None;
            self.sub.hub().stall_ended();
            return false;
        }
        let since = *stall.full_since.get_or_insert_with(|| {
            self.sub.hub().stall_started();
            now
        });
        now.duration_since(since) >= stall.timeout && self.sub.hub().someone_keeps_up()
    }

    /// Notes that a write had to wait for the socket; returns how often the
    /// wait must look at [`stalled`](Self::stalled).
    fn waiting(&mut self) -> Option<Duration> {
        self.stall.as_mut().map(|stall| {
            stall.waited = true;
            stall.timeout / 4
        })
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if self.stall.as_ref().is_some_and(|s| s.full_since.is_some()) {
            self.sub.hub().stall_ended();
        }
    }
}

/// Every subscription a send task forwards, taken in turn: after an item
/// from one, the next look starts at the one after it.
///
/// The first is kept apart from the rest, so that a session that forwards
/// one subscription (every `join`) takes the same path as when a send task
/// forwarded exactly one: no list, no turn to keep.
#[derive(Default)]
pub(crate) struct Forwards {
    first: Option<Forwarding>,
    /// Boxed: most sessions forward one subscription, and every one holds
    /// a send task for as long as it lives.
    more: Option<Box<More>>,
}

#[derive(Default)]
struct More {
    list: Vec<Forwarding>,
    /// Where the next look starts: 0 is `first`, i is `list[i - 1]`.
    next: usize,
}

impl Forwards {
    pub(crate) fn add(&mut self, new: NewForward) {
        let fwd = Forwarding::new(new);
        match self.first {
            None => self.first = Some(fwd),
            Some(_) => self.more.get_or_insert_default().list.push(fwd),
        }
    }

    fn single(&self) -> bool {
        self.more.as_ref().is_none_or(|more| more.list.is_empty())
    }

    /// Stops forwarding `key`; false if it was not forwarded.
    pub(crate) fn remove(&mut self, key: ForwardKey) -> bool {
        if self.first.as_ref().is_some_and(|fwd| fwd.key == key) {
            self.first = self.more.as_mut().and_then(|more| more.list.pop());
            return true;
        }
        let Some(more) = self.more.as_mut() else {
            return false;
        };
        match more.list.iter().position(|fwd| fwd.key == key) {
            Some(at) => {
                more.list.swap_remove(at);
                true
            }
            None => false,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.first = None;
        self.more = None;
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.as_ref().map_or(0, |more| more.list.len())
    }

    pub(crate) fn get(&mut self, at: usize) -> Option<&mut Forwarding> {
        match at {
            0 => self.first.as_mut(),
            at => self.more.as_mut()?.list.get_mut(at - 1),
        }
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Forwarding> {
        let more = self.more.as_mut().map(|more| more.list.iter_mut());
        self.first.iter_mut().chain(more.into_iter().flatten())
    }

    /// Takes every subscription out (to drain them at a close).
    pub(crate) fn take(&mut self) -> Vec<Forwarding> {
        let mut all = self.more.take().map(|more| more.list).unwrap_or_default();
        all.extend(self.first.take());
        all
    }

    fn turn(&self) -> usize {
        self.more.as_ref().map_or(0, |more| more.next)
    }

    fn took(&mut self, at: usize) {
        if let Some(more) = self.more.as_mut() {
            more.next = at + 1;
        }
    }

    /// The next item that is ready now, and whose it is.
    pub(crate) fn try_next(&mut self) -> Option<(usize, Item)> {
        if self.single() {
            return Some((0, self.first.as_mut()?.try_next()?));
        }
        let len = self.len();
        let mut at = self.turn();
        for _ in 0..len {
            if at >= len {
                at = 0;
            }
            if let Some(item) = self.get(at).and_then(Forwarding::try_next) {
                self.took(at);
                return Some((at, item));
            }
            at += 1;
        }
        None
    }

    /// Waits for the next item of any subscription (for ever if none). A
    /// subscription waiting on its hub keeps its listener between polls, so
    /// a send task that wakes for something else does not listen anew.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<(usize, Item)> {
        if self.single() {
            return match self.first.as_mut() {
                Some(fwd) => fwd.poll_next(cx).map(|item| (0, item)),
                None => Poll::Pending,
            };
        }
        let len = self.len();
        let mut at = self.turn();
        for _ in 0..len {
            if at >= len {
                at = 0;
            }
            if let Some(fwd) = self.get(at) {
                if let Poll::Ready(item) = fwd.poll_next(cx) {
                    self.took(at);
                    return Poll::Ready((at, item));
                }
            }
            at += 1;
        }
        Poll::Pending
    }

    /// Whether any subscription has kept its `Suspend` hub full too long.
    pub(crate) fn stalled(&mut self) -> bool {
        if self.single() {
            return self.first.as_mut().is_some_and(Forwarding::stalled);
        }
        // Every one is looked at: each keeps its own clock.
        self.iter_mut().fold(false, |any, fwd| fwd.stalled() | any)
    }

    /// Notes a write that waits; how often to look at [`stalled`](Self::stalled).
    pub(crate) fn waiting(&mut self) -> Option<Duration> {
        self.iter_mut().filter_map(Forwarding::waiting).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hub, HubConfig};

    fn forward(forwards: &mut Forwards, hub: &Hub, key: ForwardKey) {
        forwards.add(NewForward {
            sub: hub.subscribe(),
            key,
            topic: None,
        });
    }

    fn text(item: Item) -> String {
        match item {
            Item::Live(Ok(msg)) | Item::Backlog(msg) => msg.into_text().unwrap().to_string(),
            Item::Live(Err(err)) => panic!("{err}"),
        }
    }

    /// A hub with a long backlog does not hold back a quiet one: items are
    /// taken from each in turn.
    #[tokio::test]
    async fn a_busy_hub_does_not_starve_a_quiet_one() {
        let busy = Hub::with_config(HubConfig::default().capacity(256)).unwrap();
        let quiet = Hub::new();
        let mut forwards = Forwards::default();
        forward(&mut forwards, &busy, 1);
        forward(&mut forwards, &quiet, 2);
        for i in 0..200 {
            let _ = busy.try_publish(format!("busy {i}")).unwrap();
        }
        for i in 0..3 {
            let _ = quiet.try_publish(format!("quiet {i}")).unwrap();
        }
        let first: Vec<String> = (0..6)
            .map(|_| text(forwards.try_next().unwrap().1))
            .collect();
        assert_eq!(
            first,
            [
                "busy 0", "quiet 0", "busy 1", "quiet 1", "busy 2", "quiet 2"
            ]
        );
        // Then the busy one alone, in order, to the end.
        let rest: Vec<String> = std::iter::from_fn(|| forwards.try_next())
            .map(|(_, item)| text(item))
            .collect();
        assert_eq!(rest.len(), 197);
        assert_eq!(rest[0], "busy 3");
        assert_eq!(rest[196], "busy 199");
    }

    #[tokio::test]
    async fn a_removed_subscription_is_dropped() {
        let (a, b) = (Hub::new(), Hub::new());
        let mut forwards = Forwards::default();
        forward(&mut forwards, &a, 1);
        forward(&mut forwards, &b, 2);
        assert_eq!(b.subscriber_count(), 1);
        assert!(forwards.remove(2));
        assert!(!forwards.remove(2));
        assert_eq!(b.subscriber_count(), 0);
        let _ = b.try_publish("gone").unwrap();
        let _ = a.try_publish("here").unwrap();
        assert_eq!(text(forwards.try_next().unwrap().1), "here");
        assert!(forwards.try_next().is_none());
    }

    /// A topic subscription writes its backlog first, skips live messages
    /// the backlog already had, and announces a jump in the sequence with
    /// exactly the count skipped; presence events (seq 0) pass through.
    #[tokio::test]
    async fn a_topic_subscription_keeps_its_sequence() {
        let hub = Hub::with_config(
            HubConfig::default().lag_notice(|missed| Message::text(format!("gap {missed}"))),
        )
        .unwrap();
        let mut forwards = Forwards::default();
        forwards.add(NewForward {
            sub: hub.subscribe(),
            key: 1,
            topic: Some(TopicStart {
                backlog: ["m4", "m5"].map(Message::text).into(),
                seq: 5,
            }),
        });
        for (text, seq) in [("m5", 5), ("join", 0), ("m6", 6), ("m9", 9), ("m10", 10)] {
            let _ = hub.try_publish_seq(Message::text(text), seq).unwrap();
        }
        let seen: Vec<String> = std::iter::from_fn(|| forwards.try_next())
            .map(|(_, item)| text(item))
            .collect();
        assert_eq!(seen, ["m4", "m5", "join", "m6", "gap 2", "m9", "m10"]);
    }
}
