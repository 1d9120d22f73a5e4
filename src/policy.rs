//! The slow-client (overflow) policies, free of I/O so they unit-test without sockets.
//!
//! One hub has one bounded channel. When a subscriber cannot keep up, that
//! channel fills, and the [`Policy`] decides who pays for it. See the crate
//! documentation for the full story in plain words.

use std::fmt;
use std::str::FromStr;

/// What the hub does when its buffer is full because a subscriber lags.
///
/// Every policy is counted in [`HubStats`](crate::HubStats). Control frames
/// (pings, pongs, close frames) never travel through the hub, so no policy can
/// drop them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Publishers wait for the slowest subscriber (Ktor's `SUSPEND`, the default).
    ///
    /// Nothing is lost. The cost: one slow client slows every publisher. A
    /// session that keeps the buffer full for
    /// [`HubConfig::stall_timeout`](crate::HubConfig::stall_timeout) while
    /// others keep up is closed (code 1013, "too slow for the hub"), its
    /// subscription freed, and the hub moves on.
    #[default]
    Suspend,
    /// The oldest buffered message is evicted to make room (Ktor's `DROP_OLDEST`).
    ///
    /// Publishers never wait. A lagging subscriber skips ahead to what is still
    /// buffered; the number it missed is counted as `lagged` and can be told to
    /// the client with [`HubConfig::lag_notice`](crate::HubConfig::lag_notice).
    DropOldest,
    /// A message published into a full buffer is discarded (Ktor's `DROP_LATEST`).
    ///
    /// Publishers never wait and the publish reports
    /// [`Published::Dropped`](crate::Published::Dropped). Because the buffer is
    /// shared, a discarded message is lost for every subscriber, not only the
    /// slow one; the count is `dropped`. A client whose socket accepts nothing
    /// keeps the buffer full until [`Config::send_timeout`](crate::Config::send_timeout)
    /// closes it, and new messages are dropped for that long.
    DropLatest,
    /// A subscriber that falls behind by a full buffer is closed with 1013
    /// (Try Again Later), the way uWebSockets and Centrifugo treat slow consumers.
    ///
    /// Publishers never wait and fast subscribers lose nothing; the slow client
    /// is told why and may reconnect. The count is `disconnected`. The lag is
    /// noticed when the session next takes from the hub; a client whose socket
    /// accepts nothing at all is closed by
    /// [`Config::send_timeout`](crate::Config::send_timeout) first.
    Disconnect,
}

impl Policy {
    /// All policies, in the order the documentation lists them.
    pub const ALL: [Policy; 4] = [
        Policy::Suspend,
        Policy::DropOldest,
        Policy::DropLatest,
        Policy::Disconnect,
    ];

    /// The policy's name as [`FromStr`] accepts it: `suspend`, `drop-oldest`,
    /// `drop-latest` or `disconnect`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Suspend => "suspend",
            Policy::DropOldest => "drop-oldest",
            Policy::DropLatest => "drop-latest",
            Policy::Disconnect => "disconnect",
        }
    }

    /// Whether the channel evicts its oldest message when full (async-broadcast's
    /// overflow mode) instead of refusing or waiting.
    pub(crate) fn overflows(self) -> bool {
        matches!(self, Policy::DropOldest | Policy::Disconnect)
    }

    /// What a full channel does to a publish under this policy.
    pub(crate) fn on_full(self) -> OnFull {
        match self {
            Policy::Suspend => OnFull::Wait,
            Policy::DropLatest => OnFull::Discard,
            Policy::DropOldest | Policy::Disconnect => OnFull::EvictOldest,
        }
    }

    /// What a subscriber that missed `skipped` messages does under this policy.
    pub(crate) fn on_lag(self) -> OnLag {
        match self {
            Policy::Disconnect => OnLag::Disconnect,
            // Suspend and DropLatest never evict, so a lag cannot happen there;
            // skipping ahead is the harmless answer if it ever did.
            Policy::Suspend | Policy::DropOldest | Policy::DropLatest => OnLag::SkipAhead,
        }
    }
}

/// What a publish into a full channel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnFull {
    /// Wait until the slowest subscriber makes room.
    Wait,
    /// Discard the new message.
    Discard,
    /// Evict the oldest buffered message.
    EvictOldest,
}

/// What a subscriber does after it finds it missed messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnLag {
    /// Count the gap and go on with the oldest message still buffered.
    SkipAhead,
    /// Close the session with 1013.
    Disconnect,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`Policy`] from a string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}: expected one of suspend, drop-oldest, drop-latest, disconnect")]
pub struct ParsePolicyError(String);

impl FromStr for Policy {
    type Err = ParsePolicyError;

    /// Parses `suspend`, `drop-oldest`, `drop-latest` or `disconnect`
    /// (case-insensitive; `_` works in place of `-`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str() == wanted)
            .ok_or_else(|| ParsePolicyError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
            assert_eq!(p.to_string(), p.as_str());
        }
        assert_eq!("DROP_OLDEST".parse::<Policy>(), Ok(Policy::DropOldest));
    }

    #[test]
    fn unknown_name_is_a_clear_error() {
        let err = "fastest".parse::<Policy>().unwrap_err();
        assert!(err.to_string().contains("\"fastest\""), "{err}");
        assert!(err.to_string().contains("drop-oldest"), "{err}");
    }

    #[test]
    fn default_is_suspend_like_ktor() {
        assert_eq!(Policy::default(), Policy::Suspend);
    }

    #[test]
    fn full_channel_behaviour_per_policy() {
        assert_eq!(Policy::Suspend.on_full(), OnFull::Wait);
        assert_eq!(Policy::DropLatest.on_full(), OnFull::Discard);
        assert_eq!(Policy::DropOldest.on_full(), OnFull::EvictOldest);
        assert_eq!(Policy::Disconnect.on_full(), OnFull::EvictOldest);
        assert!(Policy::DropOldest.overflows() && Policy::Disconnect.overflows());
        assert!(!Policy::Suspend.overflows() && !Policy::DropLatest.overflows());
    }

    #[test]
    fn lag_behaviour_per_policy() {
        assert_eq!(Policy::Disconnect.on_lag(), OnLag::Disconnect);
        assert_eq!(Policy::DropOldest.on_lag(), OnLag::SkipAhead);
    }
}
