//! HTTP workers pinned one per CPU, when the region has its CPUs to itself.
//!
//! Under load the scheduler kept both HTTP workers of a 2-core region on one CPU most of the
//! time (each wakes threads that then run where it runs), leaving the other CPU a quarter
//! idle; one worker per CPU carried 9-19% more PUTs. Pinning helps only a region that owns
//! its CPUs: with a CPU quota smaller than its affinity mask (a container limited by `--cpus`)
//! or several regions per host, every region would pin onto the same first CPUs. So workers
//! are pinned only when there are exactly as many as the CPUs this process may run on.
//!
//! A thread inherits the CPUs of the thread that starts it: blocking work a handler hands to
//! a pool thread runs [`unpinned`], or it would crowd its worker's CPU.

use core_affinity::CoreId;
use std::sync::OnceLock;

/// The CPUs the process may run on, kept once workers are pinned.
static ALLOWED: OnceLock<Vec<usize>> = OnceLock::new();

/// The CPU for each HTTP worker, by start order, or `None` to leave them to the scheduler:
/// pinned only if `enabled` and there are at least two workers, one per allowed CPU.
pub fn worker_cpus(enabled: bool, workers: usize) -> Option<Vec<CoreId>> {
    let cpus = plan(enabled, workers, core_affinity::get_core_ids()?)?;
    let _ = ALLOWED.set(cpus.iter().map(|c| c.id).collect());
    Some(cpus)
}

/// Runs `work` on every CPU the process may use, whatever the calling thread was pinned to.
pub fn unpinned<R>(work: impl FnOnce() -> R) -> R {
    if let Some(cpus) = ALLOWED.get() {
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for ids below
        // CPU_SETSIZE, which the ids the kernel reported are.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for cpu in cpus.iter().filter(|c| **c < libc::CPU_SETSIZE as usize) {
                libc::CPU_SET(*cpu, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    work()
}

fn plan<T>(enabled: bool, workers: usize, cpus: Vec<T>) -> Option<Vec<T>> {
    (enabled && workers >= 2 && cpus.len() == workers).then_some(cpus)
}

/// Pins the calling thread to `cpu`; `false` if the OS refused.
pub fn pin_current_thread(cpu: CoreId) -> bool {
    core_affinity::set_for_current(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpinned_work_may_run_on_every_allowed_cpu() {
        let all = core_affinity::get_core_ids().expect("allowed CPUs").len();
        // A thread of its own, since it pins itself.
        let seen = std::thread::spawn(move || {
            let Some(cpus) = worker_cpus(true, all) else {
                return None; // one CPU: nothing is ever pinned
            };
            assert!(pin_current_thread(cpus[0]));
            let pinned = core_affinity::get_core_ids().map(|c| c.len());
            let during = unpinned(|| core_affinity::get_core_ids().map(|c| c.len()));
            Some((pinned, during))
        })
        .join()
        .expect("thread");
        if all >= 2 {
            assert_eq!(seen, Some((Some(1), Some(all))));
        }
    }

    #[test]
    fn workers_are_pinned_only_one_to_one_with_the_allowed_cpus() {
        assert_eq!(plan(true, 2, vec![0, 1]), Some(vec![0, 1]));
        assert_eq!(plan(true, 4, vec![2, 3, 6, 7]), Some(vec![2, 3, 6, 7]));
        // A quota smaller than the mask, more workers than CPUs, one worker, or switched off.
        assert_eq!(plan(true, 2, vec![0, 1, 2, 3]), None);
        assert_eq!(plan(true, 3, vec![0, 1]), None);
        assert_eq!(plan(true, 1, vec![0]), None);
        assert_eq!(plan(false, 2, vec![0, 1]), None);
    }
}
