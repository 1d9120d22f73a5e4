//! Topics: a registry of named hubs, created on first use and freed when the
//! last subscriber leaves.
//!
//! A topic is one [`Hub`]: one async-broadcast channel, subscribed by each
//! session that wants it. The registry holds no session and does not keep a
//! hub alive: it keeps a weak reference per name, so a hub lives exactly as
//! long as a subscription to it (or a handle of the user's) does.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::config::HubConfig;
use crate::error::Error;
use crate::hub::{Hub, PublishError, Published, Subscription, WeakHub};
use crate::message::Message;
use crate::metrics::Metrics;

/// Why a topic name or a new topic was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The name is empty, too long, or has a character outside
    /// [`Topics::is_valid_name`]'s set (the protocol's `bad_topic`).
    #[error("bad topic name: {0}")]
    BadName(String),
    /// [`TopicsConfig::max_topics`] topics exist (the protocol's `limit`).
    #[error("too many topics: {0}")]
    TooMany(String),
    /// The topic's configuration is invalid (from
    /// [`TopicsConfig::config_for`]).
    #[error("topic configuration: {0}")]
    Config(String),
}

/// What a [`Topics`] registry allows, and each topic's hub options.
///
/// ```
/// use wshub::{HubConfig, Policy, TopicsConfig};
///
/// let config = TopicsConfig::default()
///     .max_topics(1_000)
///     .hub_config(HubConfig::default().policy(Policy::DropOldest))
///     // Tickers keep a short buffer and drop what a slow client misses.
///     .config_for(|name| {
///         name.starts_with("ticker:")
///             .then(|| HubConfig::default().capacity(16).policy(Policy::DropOldest))
///     });
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct TopicsConfig {
    /// How many topics may exist at once.
    ///
    /// Default: 10,000. Each topic is a hub whose buffer is allocated when it
    /// is created ([`HubConfig::capacity`] slots): bound the count to the
    /// memory that many buffers take.
    pub max_topics: usize,
    /// The longest topic name, in bytes.
    ///
    /// Default: 128.
    pub max_name_len: usize,
    /// The hub options of a topic that [`config_for`](Self::config_for)
    /// gives none for.
    ///
    /// Default: [`HubConfig::default`].
    pub hub: HubConfig,
    /// Where each topic's hub is exported, labelled `hub="NAME"`.
    ///
    /// Default: `None`. A topic created while the metrics already label
    /// their [`max_hubs`](crate::MetricsBuilder::max_hubs) works as any
    /// other but is not exported, and is counted in
    /// `wshub_metrics_unlabelled_hubs_total`: the bound on label values
    /// holds whatever names clients choose.
    pub metrics: Option<Metrics>,
    overrides: Option<Overrides>,
}

type Overrides = Arc<dyn Fn(&str) -> Option<HubConfig> + Send + Sync>;

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            max_topics: 10_000,
            max_name_len: 128,
            hub: HubConfig::default(),
            metrics: None,
            overrides: None,
        }
    }
}

impl fmt::Debug for TopicsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicsConfig")
            .field("max_topics", &self.max_topics)
            .field("max_name_len", &self.max_name_len)
            .field("hub", &self.hub)
            .field("metrics", &self.metrics.is_some())
            .field("overrides", &self.overrides.is_some())
            .finish()
    }
}

impl TopicsConfig {
    /// Sets [`max_topics`](Self::max_topics).
    #[must_use]
    pub fn max_topics(mut self, max: usize) -> Self {
        self.max_topics = max;
        self
    }

    /// Sets [`max_name_len`](Self::max_name_len).
    #[must_use]
    pub fn max_name_len(mut self, bytes: usize) -> Self {
        self.max_name_len = bytes;
        self
    }

    /// Sets [`hub`](Self::hub), the default for every topic.
    #[must_use]
    pub fn hub_config(mut self, config: HubConfig) -> Self {
        self.hub = config;
        self
    }

    /// Sets [`metrics`](Self::metrics).
    #[must_use]
    pub fn metrics(mut self, metrics: Option<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Options per topic name: `choose` is asked once, when a topic is
    /// created; `None` takes the default [`hub`](Self::hub).
    #[must_use]
    pub fn config_for(
        mut self,
        choose: impl Fn(&str) -> Option<HubConfig> + Send + Sync + 'static,
    ) -> Self {
        self.overrides = Some(Arc::new(choose));
        self
    }

    fn config(&self, name: &str) -> HubConfig {
        self.overrides
            .as_ref()
            .and_then(|choose| choose(name))
            .unwrap_or_else(|| self.hub.clone())
    }
}

/// A registry of named hubs: a topic is created by its first subscriber and
/// freed when its last subscription (and every [`Hub`] handle to it) is
/// dropped. Cloning shares the registry.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use wshub::{Message, Published, Topics};
///
/// let topics = Topics::default();
/// let mut news = topics.subscribe("news").unwrap();
/// assert_eq!(topics.publish("news", Message::text("hi")).await.unwrap(), Published::Queued);
/// assert_eq!(news.recv().await.unwrap(), Message::text("hi"));
/// // Nobody listens to "sport": the publish creates nothing.
/// assert_eq!(topics.publish("sport", Message::text("goal")).await.unwrap(), Published::NoSubscribers);
/// assert_eq!(topics.len(), 1);
/// drop(news);
/// assert_eq!(topics.len(), 0); // freed with its last subscriber
/// # }
/// ```
///
/// A session forwards a topic like any hub: `session.join(topics.subscribe(name)?)`.
#[derive(Clone, Default)]
pub struct Topics {
    shared: Arc<Registry>,
}

#[derive(Default)]
struct Registry {
    config: TopicsConfig,
    hubs: Mutex<HashMap<Arc<str>, WeakHub>>,
}

impl fmt::Debug for Topics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topics")
            .field("config", &self.shared.config)
            .field("topics", &self.len())
            .finish()
    }
}

impl Topics {
    /// A registry with these bounds and hub options.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if [`TopicsConfig::hub`] is not a valid hub
    /// configuration (see [`Hub::with_config`]), or `max_topics` or
    /// `max_name_len` is 0.
    pub fn new(config: TopicsConfig) -> Result<Topics, Error> {
        if config.max_topics == 0 || config.max_name_len == 0 {
            return Err(Error::Config(
                "max_topics and max_name_len must be at least 1".into(),
            ));
        }
        // The default is checked here; an override when a topic uses it.
        Hub::check_config(&config.hub)?;
        Ok(Topics {
            shared: Arc::new(Registry {
                config,
                hubs: Mutex::default(),
            }),
        })
    }

    /// The registry's bounds and default hub options.
    pub fn config(&self) -> &TopicsConfig {
        &self.shared.config
    }

    /// Whether `name` is a valid topic name here: 1 to
    /// [`max_name_len`](TopicsConfig::max_name_len) bytes of ASCII letters,
    /// digits and `- _ . : / @ = + #`.
    pub fn is_valid_name(&self, name: &str) -> bool {
        self.check_name(name).is_ok()
    }

    pub(crate) fn check_name(&self, name: &str) -> Result<(), TopicError> {
        let max = self.shared.config.max_name_len;
        if name.is_empty() {
            return Err(TopicError::BadName("a topic name cannot be empty".into()));
        }
        if name.len() > max {
            return Err(TopicError::BadName(format!(
                "a topic name of {} bytes: at most {max} allowed",
                name.len()
            )));
        }
        if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
            return Err(TopicError::BadName(format!(
                "{bad:?} is not allowed in a topic name \
                 (ASCII letters, digits and - _ . : / @ = + # are)"
            )));
        }
        Ok(())
    }

    /// The hub of topic `name`, created if it does not exist.
    ///
    /// The topic lives while the returned hub, or a subscription to it, does.
    ///
    /// # Errors
    ///
    /// [`TopicError::BadName`] for an invalid name; [`TopicError::TooMany`]
    /// if creating it would pass [`max_topics`](TopicsConfig::max_topics);
    /// [`TopicError::Config`] if [`config_for`](TopicsConfig::config_for)
    /// gave an invalid configuration for it.
    pub fn hub(&self, name: &str) -> Result<Hub, TopicError> {
        self.check_name(name)?;
        let mut hubs = self.lock();
        // A closed hub (a topic whose broker restarted it) serves its
        // subscribers' last messages; a new subscriber gets a new one.
        if let Some(hub) = hubs
            .get(name)
            .and_then(WeakHub::upgrade)
            .filter(|hub| !hub.is_closed())
        {
            return Ok(hub);
        }
        let max = self.shared.config.max_topics;
        if hubs.len() >= max {
            hubs.retain(|_, hub| hub.is_alive());
            if hubs.len() >= max {
                return Err(TopicError::TooMany(format!(
                    "{} topics exist, the most this registry holds ({name:?} refused)",
                    hubs.len()
                )));
            }
        }
        let hub = Hub::with_config(self.shared.config.config(name))
            .map_err(|err| TopicError::Config(format!("topic {name:?}: {err}")))?;
        hubs.insert(Arc::from(name), hub.downgrade());
        if let Some(metrics) = &self.shared.config.metrics {
            // The name is valid and free among live hubs; only the bound
            // on labels (or another registry's hub of the same name) can
            // refuse it.
            if metrics.register_hub(name, &hub).is_err() {
                metrics.hub_unlabelled();
            }
        }
        Ok(hub)
    }

    /// Subscribes to topic `name`, creating it if needed: what
    /// [`Hub::subscribe`] does on the topic's hub.
    ///
    /// # Errors
    ///
    /// As [`hub`](Self::hub).
    pub fn subscribe(&self, name: &str) -> Result<Subscription, TopicError> {
        // The hub handle keeps the topic alive until the subscription does.
        let hub = self.hub(name)?;
        Ok(hub.subscribe())
    }

    /// The hub of topic `name` if it exists now, without creating it.
    pub fn get(&self, name: &str) -> Option<Hub> {
        self.lock().get(name).and_then(WeakHub::upgrade)
    }

    /// Publishes to topic `name` if it exists; a topic nobody subscribes to
    /// does not exist, so the message reaches no one, as a publish to a hub
    /// without subscribers does ([`Published::NoSubscribers`]).
    ///
    /// # Errors
    ///
    /// As [`Hub::publish`]; [`PublishError::NotData`] for a control frame.
    pub async fn publish(&self, name: &str, msg: Message) -> Result<Published, PublishError> {
        match self.get(name) {
            Some(hub) => hub.publish(msg).await,
            None if crate::message::is_data(&msg) => Ok(Published::NoSubscribers),
            None => Err(PublishError::NotData(msg)),
        }
    }

    /// How many topics exist now.
    pub fn len(&self) -> usize {
        let mut hubs = self.lock();
        hubs.retain(|_, hub| hub.is_alive());
        hubs.len()
    }

    /// Whether no topic exists now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names of the topics that exist now, in no particular order.
    pub fn names(&self) -> Vec<String> {
        let mut hubs = self.lock();
        hubs.retain(|_, hub| hub.is_alive());
        hubs.keys().map(|name| name.to_string()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, WeakHub>> {
        self.shared.hubs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The characters a topic name may have.
fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.:/@=+#".contains(c)
}
