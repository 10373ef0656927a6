//! The retry policy as pure logic: how an attempt's per-recipient outcomes change a message's record, and when it is tried next.

use std::time::Duration;

use super::dsn_policy;
use crate::spool::{Meta, RcptStatus};
use crate::transport::{Delivery, Enhanced, Failure, FailureClass, Severity};

/// Retry and rewrite policy (from `[delivery]` and `[upstream]`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Bounce what is still undelivered after this long.
    pub give_up_after: Duration,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Our host name, for DSNs.
    pub hostname: String,
    /// Display name for the rewritten `From` (seed: Sender Name).
    pub sender_name: String,
    /// Address outgoing mail is sent from (seed: Reply to); empty = unchanged.
    pub reply_to: String,
    /// Local user name → upstream mailbox (the Basic-to-OAuth bridge).
    pub identities: std::collections::HashMap<String, String>,
    /// Which senders get a DSN (`delivery.dsn_to`).
    pub dsn: dsn_policy::DsnPolicy,
    /// The mailbox the upstream sends as: the address on a DSN's `From:`,
    /// so that Exchange's send-as rule lets it out. Empty =
    /// `MAILER-DAEMON@<hostname>`.
    pub dsn_from: String,
    /// Display name on a DSN's `From:` (`delivery.dsn_from_name`).
    pub dsn_from_name: String,
}

impl Policy {
    /// The policy a configuration asks for.
    pub fn from_config(c: &crate::config::Config) -> Policy {
        Policy {
            retry_initial: Duration::from_secs(c.delivery.retry_initial_secs),
            retry_max: Duration::from_secs(c.delivery.retry_max_secs),
            give_up_after: Duration::from_secs(c.delivery.give_up_after_secs),
            concurrency: c.delivery.concurrency,
            hostname: c.effective_hostname(),
            sender_name: c.upstream.sender_name.clone(),
            reply_to: c.upstream.reply_to.clone(),
            identities: c
                .users
                .iter()
                .map(|u| (u.name.clone(), u.mailbox.clone()))
                .collect(),
            dsn: dsn_policy::DsnPolicy::from_config(c),
            dsn_from: Some(c.upstream.effective_mailbox())
                .filter(|m| m.contains('@'))
                .unwrap_or_default()
                .to_string(),
            dsn_from_name: c.delivery.dsn_from_name.clone(),
        }
    }

    /// The upstream mailbox a message goes out as: the mapped identity of
    /// its local user, else `None` (the configured default).
    pub fn identity_for(&self, meta: &Meta) -> Option<String> {
        meta.auth_user
            .as_ref()
            .and_then(|u| self.identities.get(u))
            .filter(|m| !m.is_empty())
            .cloned()
    }

    /// The `From:` of a DSN for `meta`: the mailbox its original went out
    /// as, with the configured display name.
    pub fn dsn_from_header(&self, meta: &Meta) -> String {
        let addr = self
            .identity_for(meta)
            .or_else(|| (!self.dsn_from.is_empty()).then(|| self.dsn_from.clone()))
            .unwrap_or_else(|| format!("MAILER-DAEMON@{}", self.hostname));
        let name: String = self
            .dsn_from_name
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        crate::message::format_mailbox(name.trim(), &addr)
    }

    /// The delay before attempt `attempts + 1`: doubling from `retry_initial`,
    /// capped at `retry_max`, then spread by ±25% so retries do not march in step.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let base = self
            .retry_initial
            .saturating_mul(1u32 << exp)
            .min(self.retry_max);
        base.mul_f64(rand::random_range(0.75..1.25))
    }
}

/// What happens to a message after an attempt.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Some recipients are still pending: try again after this long.
    Retry(Duration),
    /// Only the upstream's throttling kept them pending: try again after
    /// the pause, before mail that arrived later.
    Throttled(Duration),
    /// No recipient is pending any more.
    Done,
}

/// Record the outcome of delivering to `tried` in `meta` and decide what
/// comes next. `age` is how long the message has been queued.
///
/// Each recipient keeps the failure's class, reply code and enhanced status
/// code for the DSN. An attempt whose only failures were throttling (the
/// mailbox's budget upstream, not this message) is not counted towards the
/// backoff: it is retried as soon as the upstream's pause ends.
pub fn apply(
    meta: &mut Meta,
    tried: &[String],
    result: &Delivery,
    age: Duration,
    policy: &Policy,
) -> Next {
    let mut wait: Option<Duration> = None;
    let mut last: Option<String> = None;
    let mut failures = 0usize;
    let mut throttled = 0usize;
    let mut record = |meta: &mut Meta, addr: &str, outcome: Result<(), &Failure>| {
        let Some(r) = meta
            .rcpts
            .iter_mut()
            .find(|r| r.addr == addr && r.status == RcptStatus::Pending)
        else {
            return;
        };
        match outcome {
            Ok(()) => {
                r.status = RcptStatus::Delivered;
                r.last_error = None;
                r.class = None;
                r.reply_code = None;
                r.enhanced = None;
            }
            Err(f) => {
                failures += 1;
                r.last_error = Some(f.text.clone());
                r.class = Some(f.class());
                r.reply_code = f.reply_code;
                r.enhanced = f.enhanced;
                last = Some(f.text.clone());
                if f.severity == Severity::Permanent {
                    r.status = RcptStatus::Failed;
                } else {
                    if f.throttled {
                        throttled += 1;
                    }
                    if let Some(nb) = f.not_before {
                        wait = Some(wait.map_or(nb, |w| w.max(nb)));
                    }
                }
            }
        }
    };
    match result {
        Ok(per) => {
            let missing = Failure::transient("upstream gave no answer for this recipient");
            for (i, addr) in tried.iter().enumerate() {
                record(
                    meta,
                    addr,
                    per.get(i).map_or(Err(&missing), |r| r.as_ref().map(|_| ())),
                );
            }
        }
        Err(f) => {
            for addr in tried {
                record(meta, addr, Err(f));
            }
        }
    }
    let only_throttled = failures > 0 && throttled == failures;
    if !only_throttled {
        meta.attempts += 1;
    }
    if last.is_some() {
        meta.last_error = last;
    }
    if meta.pending().is_empty() {
        return Next::Done;
    }
    if age >= policy.give_up_after {
        meta.last_error = Some(format!(
            "gave up after {} attempts over {}h: {}",
            meta.attempts,
            age.as_secs() / 3600,
            meta.last_error.as_deref().unwrap_or("no answer")
        ));
        // Each recipient keeps its last upstream answer (the DSN's
        // Diagnostic-Code) and is reported as 4.4.7, delivery time expired.
        for r in meta
            .rcpts
            .iter_mut()
            .filter(|r| r.status == RcptStatus::Pending)
        {
            r.status = RcptStatus::Failed;
            r.class = Some(FailureClass::Expired);
            r.enhanced = Some(Enhanced::new(4, 4, 7));
            if r.last_error.is_none() {
                r.last_error = Some("no answer from the upstream".into());
            }
        }
        return Next::Done;
    }
    if only_throttled {
        // First in line again as soon as the pause ends; no backoff.
        return Next::Throttled(wait.unwrap_or(THROTTLED_RETRY));
    }
    let backoff = policy.backoff(meta.attempts);
    Next::Retry(wait.map_or(backoff, |w| w.max(backoff)))
}

/// Retry delay after throttling that named no wait.
const THROTTLED_RETRY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(5 * 86400),
            concurrency: 2,
            hostname: "relay.test".into(),
            sender_name: String::new(),
            reply_to: String::new(),
            identities: Default::default(),
            dsn: super::dsn_policy::DsnPolicy::any(),
            dsn_from: "desk@relay.test".into(),
            dsn_from_name: "Mail Delivery System".into(),
        }
    }

    fn meta() -> Meta {
        Meta::new(
            "m1".into(),
            "s@x".into(),
            vec!["a@x".into(), "b@x".into()],
            1,
            0,
        )
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = policy();
        for (attempts, base) in [(1u32, 60u64), (2, 120), (3, 240), (10, 3600), (40, 3600)] {
            let d = p.backoff(attempts).as_secs_f64();
            assert!(
                d >= base as f64 * 0.75 && d <= base as f64 * 1.25,
                "{attempts}: {d}"
            );
        }
    }

    #[test]
    fn per_recipient_outcomes() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Ok(vec![Ok(()), Err(Failure::transient("452 4.2.2 full"))]);
        assert!(matches!(
            apply(&mut m, &tried, &r, Duration::ZERO, &policy()),
            Next::Retry(_)
        ));
        assert_eq!(m.pending(), ["b@x"]);
        let r: Delivery = Ok(vec![Err(Failure::permanent("550 5.1.1 unknown"))]);
        assert_eq!(
            apply(&mut m, &["b@x".into()], &r, Duration::ZERO, &policy()),
            Next::Done
        );
        assert_eq!(m.rcpts[1].status, RcptStatus::Failed);
        assert_eq!(m.attempts, 2);
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Err(Failure::server("429").with_not_before(Duration::from_secs(7200)));
        assert_eq!(
            apply(&mut m, &tried, &r, Duration::ZERO, &policy()),
            Next::Retry(Duration::from_secs(7200))
        );
    }

    #[test]
    fn failures_keep_their_class_and_status_codes() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Ok(vec![
            Err(Failure::permanent("550 5.1.1 unknown")
                .with_reply(550, Some(Enhanced::new(5, 1, 1)))),
            Err(Failure::transient("451 4.3.0 later").with_reply(451, None)),
        ]);
        assert!(matches!(
            apply(&mut m, &tried, &r, Duration::ZERO, &policy()),
            Next::Retry(_)
        ));
        let (a, b) = (&m.rcpts[0], &m.rcpts[1]);
        assert_eq!(
            (a.status, a.class, a.reply_code, a.enhanced),
            (
                RcptStatus::Failed,
                Some(FailureClass::Message),
                Some(550),
                Some(Enhanced::new(5, 1, 1))
            )
        );
        assert_eq!(
            (b.status, b.class, b.reply_code, b.enhanced),
            (
                RcptStatus::Pending,
                Some(FailureClass::Message),
                Some(451),
                None
            )
        );
        // Delivered later: the record is cleared.
        apply(
            &mut m,
            &["b@x".into()],
            &Ok(vec![Ok(())]),
            Duration::ZERO,
            &policy(),
        );
        assert_eq!(
            (m.rcpts[1].status, m.rcpts[1].class, m.rcpts[1].reply_code),
            (RcptStatus::Delivered, None, None)
        );
    }

    #[test]
    fn throttling_does_not_burn_the_backoff() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Err(Failure::throttled("429", Duration::from_secs(3)));
        for _ in 0..5 {
            assert_eq!(
                apply(&mut m, &tried, &r, Duration::ZERO, &policy()),
                Next::Throttled(Duration::from_secs(3)),
                "exactly the pause, no backoff"
            );
        }
        assert_eq!(m.attempts, 0);
        assert_eq!(m.rcpts[0].class, Some(FailureClass::Throttled));
        // A failure of the message itself counts.
        let r: Delivery = Err(Failure::transient("451 4.3.0 later"));
        assert!(
            matches!(apply(&mut m, &tried, &r, Duration::ZERO, &policy()), Next::Retry(d) if d >= Duration::from_secs(45))
        );
        assert_eq!(m.attempts, 1);
    }

    #[test]
    fn gives_up_after_the_configured_age() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Err(Failure::server("451 4.3.0 connection refused")
            .with_reply(451, Some(Enhanced::new(4, 3, 0))));
        assert_eq!(
            apply(
                &mut m,
                &tried,
                &r,
                Duration::from_secs(5 * 86400),
                &policy()
            ),
            Next::Done
        );
        assert!(m.rcpts.iter().all(|r| r.status == RcptStatus::Failed));
        assert!(
            m.last_error
                .as_deref()
                .unwrap()
                .starts_with("gave up after 1 attempts")
        );
        let r = &m.rcpts[0];
        assert_eq!(
            (r.class, r.enhanced, r.reply_code),
            (
                Some(FailureClass::Expired),
                Some(Enhanced::new(4, 4, 7)),
                Some(451)
            )
        );
        assert_eq!(
            r.last_error.as_deref(),
            Some("451 4.3.0 connection refused"),
            "the last upstream answer is kept"
        );
    }

    #[test]
    fn whole_message_permanent_failure() {
        let mut m = meta();
        let tried = m.pending();
        assert_eq!(
            apply(
                &mut m,
                &tried,
                &Err(Failure::permanent("554 5.2.0 SendAsDenied")),
                Duration::ZERO,
                &policy()
            ),
            Next::Done
        );
        assert!(m.pending().is_empty());
    }
}
