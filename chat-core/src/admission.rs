//! Admission control for [`LocalSessions`](crate::LocalSessions): a bound on
//! the turns generating at once, fixed or adapted to how loaded the process is.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// A bound that follows the machine: it grows while turns queue and the
/// runtime keeps up (its timers fire on time), and shrinks when they fire
/// late (the CPU is saturated, by this process or by others on it).
///
/// A fixed bound cannot be right everywhere: too low, a fast machine queues
/// turns with cores to spare; too high, a slow one slows every stream down.
/// The bound moves every [`window`](Self::window): by a sixteenth up, by an
/// eighth down, within `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdaptiveAdmission {
    /// The bound to start from.
    pub initial: usize,
    /// The lowest bound.
    pub min: usize,
    /// The highest bound (memory: each running turn holds its state and output).
    pub max: usize,
    /// Mean timer lateness under which the bound may grow. Default 2 ms.
    pub grow_below: Duration,
    /// Mean timer lateness above which the bound shrinks. Default 6 ms.
    pub shrink_above: Duration,
    /// How long lateness is averaged before the bound moves. Default 100 ms.
    pub window: Duration,
}

impl AdaptiveAdmission {
    /// Starts at `initial`, moves within `min..=max` (each at least 1), with the default thresholds.
    pub fn new(min: usize, initial: usize, max: usize) -> Self {
        let min = min.clamp(1, Semaphore::MAX_PERMITS);
        let max = max.clamp(min, Semaphore::MAX_PERMITS);
        Self {
            initial: initial.clamp(min, max),
            min,
            max,
            grow_below: Duration::from_millis(2),
            shrink_above: Duration::from_millis(6),
            window: Duration::from_millis(100),
        }
    }

    /// The bound after a window whose timers were `late` on average, with
    /// `queued` turns waiting: up a sixteenth, down an eighth, or the same.
    pub fn next_bound(&self, bound: usize, late: Duration, queued: usize) -> usize {
        if late > self.shrink_above {
            bound.saturating_sub((bound / 8).max(1)).max(self.min)
        } else if late < self.grow_below && queued > 0 {
            bound.saturating_add((bound / 16).max(1)).min(self.max)
        } else {
            bound
        }
    }
}

/// How often the lateness probe sleeps within a window.
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// The permits of the turns generating now.
#[derive(Debug)]
pub(crate) struct Admission {
    sem: Arc<Semaphore>,
    /// The bound now: permits free plus held, less those owed.
    bound: AtomicUsize,
    /// Permits to retire as they come back (the bound shrank below those held).
    owed: AtomicUsize,
    /// Turns waiting for a permit.
    queued: AtomicUsize,
    adaptive: Option<AdaptiveAdmission>,
    /// Whether the adaptive controller's task runs.
    controlled: AtomicBool,
}

/// A generating turn's permit; returned (or retired, when the bound shrank) on drop.
#[derive(Debug)]
pub(crate) struct AdmissionPermit {
    permit: Option<OwnedSemaphorePermit>,
    admission: Arc<Admission>,
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let retire = self
            .admission
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if retire {
            permit.forget();
        }
    }
}

impl Admission {
    /// At most `max` turns at once (`0` is taken as 1).
    pub(crate) fn fixed(max: usize) -> Self {
        Self::with_bound(max.clamp(1, Semaphore::MAX_PERMITS), None)
    }

    /// A bound that moves with the runtime's timer lateness.
    pub(crate) fn adaptive(settings: AdaptiveAdmission) -> Self {
        Self::with_bound(settings.initial, Some(settings))
    }

    fn with_bound(bound: usize, adaptive: Option<AdaptiveAdmission>) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(bound)),
            bound: AtomicUsize::new(bound),
            owed: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            adaptive,
            controlled: AtomicBool::new(false),
        }
    }

    /// The bound now.
    pub(crate) fn bound(&self) -> usize {
        self.bound.load(Ordering::Relaxed)
    }

    /// Turns waiting for a permit.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Permits free now.
    pub(crate) fn free(&self) -> usize {
        self.sem.available_permits()
    }

    /// A permit if one is free now; `None` when the turn has to queue.
    pub(crate) fn try_admit(self: &Arc<Self>) -> Option<AdmissionPermit> {
        self.start_controller();
        let permit = self.sem.clone().try_acquire_owned().ok()?;
        Some(self.wrap(permit))
    }

    /// Waits for a permit (`None` once `cancel` fires).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        cancel: &CancellationToken,
    ) -> Option<AdmissionPermit> {
        if let Some(p) = self.try_admit() {
            return Some(p);
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        let permit = cancel
            .run_until_cancelled(self.sem.clone().acquire_owned())
            .await
            .and_then(Result::ok);
        self.queued.fetch_sub(1, Ordering::Relaxed);
        permit.map(|p| self.wrap(p))
    }

    fn wrap(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> AdmissionPermit {
        AdmissionPermit {
            permit: Some(permit),
            admission: self.clone(),
        }
    }

    /// Moves the bound to `to`: new permits first pay off those owed; a
    /// lower bound retires free permits now and held ones as they come back.
    pub(crate) fn set_bound(&self, to: usize) {
        let from = self.bound.swap(to, Ordering::AcqRel);
        if to > from {
            let mut add = to - from;
            let _ = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                    let paid = owed.min(to - from);
                    add = to - from - paid;
                    Some(owed - paid)
                });
            self.sem.add_permits(add);
        } else if from > to {
            let cut = from - to;
            let now = self.sem.forget_permits(cut);
            self.owed.fetch_add(cut - now, Ordering::AcqRel);
        }
    }

    /// Starts the adaptive controller once, on the runtime of the first turn.
    fn start_controller(self: &Arc<Self>) {
        let Some(settings) = self.adaptive else {
            return;
        };
        // A plain load first: every admission passes here, and only the
        // first may write the shared flag.
        if self.controlled.load(Ordering::Relaxed) || self.controlled.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(control(Arc::downgrade(self), settings));
    }
}

/// Measures how late the runtime's timers fire, a window at a time, and
/// moves the bound; ends with the last handle on the admission.
async fn control(admission: Weak<Admission>, settings: AdaptiveAdmission) {
    let probes = (settings.window.as_nanos() / PROBE_EVERY.as_nanos()).max(1) as u32;
    loop {
        let mut late = Duration::ZERO;
        for _ in 0..probes {
            let asleep = tokio::time::Instant::now();
            tokio::time::sleep(PROBE_EVERY).await;
            late += asleep.elapsed().saturating_sub(PROBE_EVERY);
        }
        let Some(admission) = admission.upgrade() else {
            return;
        };
        let late = late / probes;
        let bound = admission.bound();
        let next = settings.next_bound(bound, late, admission.queued());
        if next != bound {
            tracing::debug!(
                from = bound,
                to = next,
                late_us = late.as_micros() as u64,
                queued = admission.queued(),
                "admission bound moved"
            );
            admission.set_bound(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_grows_slowly_while_turns_queue_and_shrinks_fast_when_late() {
        let s = AdaptiveAdmission::new(100, 1000, 1500);
        let ms = Duration::from_millis;
        assert_eq!(s.next_bound(1000, ms(1), 5), 1062, "on time, queued: up");
        assert_eq!(s.next_bound(1000, ms(1), 0), 1000, "nothing queued: stay");
        assert_eq!(
            s.next_bound(1000, ms(4), 5),
            1000,
            "between the thresholds: stay"
        );
        assert_eq!(s.next_bound(1000, ms(7), 5), 875, "late: down an eighth");
        assert_eq!(s.next_bound(1490, ms(0), 5), 1500, "never above max");
        assert_eq!(s.next_bound(105, ms(9), 5), 100, "never below min");
        assert_eq!(AdaptiveAdmission::new(0, 0, 0).next_bound(1, ms(0), 1), 1);
    }

    #[tokio::test]
    async fn a_lower_bound_retires_held_permits_as_they_come_back() {
        let a = Arc::new(Admission::fixed(3));
        let p1 = a.try_admit().unwrap();
        let p2 = a.try_admit().unwrap();
        a.set_bound(1);
        assert_eq!(a.free(), 0, "the free permit is retired at once");
        assert!(a.try_admit().is_none());
        drop(p1);
        assert_eq!(a.free(), 0, "a returned permit pays what is owed");
        drop(p2);
        assert_eq!(a.free(), 1, "then the bound is free again");
        let p = a.try_admit().unwrap();
        a.set_bound(2);
        assert_eq!(a.free(), 1);
        drop(p);
        assert_eq!(a.free(), 2);
    }

    #[tokio::test]
    async fn raising_the_bound_cancels_what_is_owed_first() {
        let a = Arc::new(Admission::fixed(2));
        let held = [a.try_admit().unwrap(), a.try_admit().unwrap()];
        a.set_bound(0);
        a.set_bound(1);
        assert_eq!(a.free(), 0, "one held permit is still owed");
        drop(held);
        assert_eq!(a.free(), 1);
        assert_eq!(a.bound(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_controller_raises_the_bound_while_turns_queue_on_an_idle_runtime() {
        let a = Arc::new(Admission::adaptive(AdaptiveAdmission::new(1, 1, 4)));
        let cancel = CancellationToken::new();
        let held = a.try_admit().unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            let cancel = cancel.clone();
            async move { a.admit(&cancel).await.is_some() }
        });
        // Paused time: every timer fires exactly on time.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(waiter.await.unwrap(), "the queued turn got a permit");
        assert_eq!(a.bound(), 2);
        drop(held);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(a.bound(), 2, "nothing queued: the bound stays");
    }
}
