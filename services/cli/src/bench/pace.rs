//! Open-loop pacing for `--rate`: each worker sends on a fixed schedule, whatever the server
//! does, and a request held back by slow answers has its latency counted from when it was
//! due. A closed loop sends less while the server stalls and so hides the stall from its own
//! figures (coordinated omission); a schedule charges every request the stall delayed.

use std::time::{Duration, Instant};

/// One worker's share of a fixed request rate.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// When this worker's first request is due.
    first: Instant,
    /// Seconds between two of this worker's requests.
    interval_s: f64,
    /// Requests scheduled so far.
    scheduled: u64,
}

impl Pace {
    /// Worker `id` of `workers`, which together send `rate` requests per second from `start`.
    /// Workers are staggered evenly across one interval, so the total is smooth rather than
    /// `workers` requests at once.
    pub fn for_worker(rate: u64, workers: u64, id: u64, start: Instant) -> Self {
        let workers = workers.max(1);
        let interval_s = workers as f64 / rate.max(1) as f64;
        let offset = interval_s * (id % workers) as f64 / workers as f64;
        Pace {
            first: start + Duration::from_secs_f64(offset),
            interval_s,
            scheduled: 0,
        }
    }

    /// When the next request is due; each call moves the schedule on by one request.
    pub fn next_due(&mut self) -> Instant {
        // From the first due time each call, so rounding never accumulates over a long run.
        let due = self.first + Duration::from_secs_f64(self.interval_s * self.scheduled as f64);
        self.scheduled += 1;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_together_keep_the_rate() {
        let start = Instant::now();
        let window = Duration::from_secs(2);
        let mut due_in_window = 0;
        for id in 0..7 {
            let mut pace = Pace::for_worker(1000, 7, id, start);
            loop {
                let due = pace.next_due();
                if due >= start + window {
                    break;
                }
                assert!(due >= start);
                due_in_window += 1;
            }
        }
        // 1000/s for 2 s, give or take one request per worker at the window's edge.
        assert!((1993..=2007).contains(&due_in_window), "{due_in_window}");
    }

    #[test]
    fn workers_are_staggered_across_one_interval() {
        let start = Instant::now();
        let mut firsts: Vec<Duration> = (0..4)
            .map(|id| Pace::for_worker(400, 4, id, start).next_due() - start)
            .collect();
        firsts.sort();
        // Each worker sends every 10 ms; the four start 2.5 ms apart.
        let expected = [0.0, 2.5, 5.0, 7.5];
        for (got, want) in firsts.iter().zip(expected) {
            assert!((got.as_secs_f64() * 1e3 - want).abs() < 1e-6, "{firsts:?}");
        }
    }

    #[test]
    fn a_late_worker_keeps_its_schedule_instead_of_shifting_it() {
        let start = Instant::now();
        let mut pace = Pace::for_worker(100, 1, 0, start);
        let dues: Vec<Duration> = (0..5)
            .map(|_| {
                // The caller falls behind by more than an interval each time.
                std::thread::sleep(Duration::from_millis(15));
                pace.next_due() - start
            })
            .collect();
        // Due times do not depend on when the caller asks: a stalled server owes the backlog.
        let want: Vec<Duration> = (0..5).map(|i| Duration::from_millis(10 * i)).collect();
        for (got, want) in dues.iter().zip(&want) {
            assert!(got.abs_diff(*want) < Duration::from_micros(1), "{dues:?}");
        }
    }
}
