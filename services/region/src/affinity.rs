//! HTTP workers pinned one per CPU, when the region has its CPUs to itself.
//!
//! Under load the scheduler kept both HTTP workers of a 2-core region on one CPU most of the
//! time (each wakes threads that then run where it runs), leaving the other CPU a quarter
//! idle; one worker per CPU carried 15-20% more PUTs. Pinning helps only a region that owns
//! its CPUs: with a CPU quota smaller than its affinity mask (a container limited by `--cpus`)
//! or several regions per host, every region would pin onto the same first CPUs. So workers
//! are pinned only when there are exactly as many as the CPUs this process may run on.

use core_affinity::CoreId;

/// The CPU for each HTTP worker, by start order, or `None` to leave them to the scheduler:
/// pinned only if `enabled` and there are at least two workers, one per allowed CPU.
pub fn worker_cpus(enabled: bool, workers: usize) -> Option<Vec<CoreId>> {
    plan(enabled, workers, core_affinity::get_core_ids()?)
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
    use super::plan;

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
