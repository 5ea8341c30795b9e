//! `dtrain bench --simulate`: DDP's VGG11 step on N hosts, on paper.
//!
//! One rank per host on a link of `--link-gbit` and `--latency-us`. The buckets are the real
//! [`BucketPlan`] of VGG11; a bucket is ready when backward has done the conv layers behind
//! its last gradient (their share of backward's multiply-adds; the classifier's are first and
//! negligible), and the wire runs one bucket at a time, each with the all-reduce dtrain picks
//! for N ([`cost_model::chosen_algo`]). The step is the one-process step or, if later, the
//! moment the last bucket lands. What the model leaves out: the CPU time TCP takes on the
//! rank's core, switch contention, stragglers.

use engine::vgg::{Vgg, VggConfig};
use transport::algorithms::cost_model::{chosen_algo, AllReduceAlgo, Link};

use crate::sync::ddp::BucketPlan;

/// What the simulation needs to know.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub link: Link,
    /// Forward + backward + SGD of one process on its batch, seconds.
    pub step_s: f64,
    /// Backward's share of `step_s` (the rest comes before it).
    pub backward_share: f64,
    pub batch: usize,
    pub first_bucket_mb: f64,
    pub bucket_cap_mb: f64,
}

/// One predicted row.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub hosts: usize,
    /// All-reduce of the whole gradient at once, per algorithm (seconds).
    pub whole: Vec<(AllReduceAlgo, f64)>,
    pub algo: AllReduceAlgo,
    pub step_s: f64,
    /// Communication left after backward (the step minus the one-process step).
    pub exposed_s: f64,
}

impl Prediction {
    pub fn efficiency(&self, one_process_s: f64) -> f64 {
        one_process_s / self.step_s
    }
}

/// Each bucket's bytes and ready time (seconds from the step's start), in launch order.
pub fn bucket_timeline(s: &Scenario) -> Vec<(f64, f64)> {
    let config = VggConfig::vgg11();
    let model = Vgg::<f32>::new(config.clone(), 0);
    let plan = BucketPlan::for_model(&model, s.first_bucket_mb, s.bucket_cap_mb);
    let macs: Vec<f64> = config
        .conv_geoms(s.batch)
        .iter()
        .map(|(_, g)| g.macs() as f64)
        .collect();
    let total: f64 = macs.iter().sum();
    let blocks = macs.len();
    // Parameters are [conv weight, conv bias, BN weight, BN bias] per block, then the
    // classifier; backward meets them in reverse. A conv's gradients are final once its own
    // backward is done, its BN's just before.
    let ready = |p: usize| -> f64 {
        if p >= 4 * blocks {
            return 0.0;
        }
        let (k, conv) = (p / 4, p % 4 < 2);
        let from = if conv { k } else { k + 1 };
        macs[from..].iter().sum::<f64>() / total
    };
    let forward_s = s.step_s * (1.0 - s.backward_share);
    let backward_s = s.step_s * s.backward_share;
    plan.buckets()
        .iter()
        .map(|b| {
            let last = b.params.iter().map(|&p| ready(p)).fold(0.0, f64::max);
            (b.len as f64 * 4.0, forward_s + last * backward_s)
        })
        .collect()
}

/// The step on `hosts` hosts.
pub fn predict(s: &Scenario, hosts: usize) -> Prediction {
    let timeline = bucket_timeline(s);
    let algo = chosen_algo(hosts);
    let mut wire_free = 0.0f64;
    for &(bytes, ready) in &timeline {
        wire_free = wire_free.max(ready) + algo.seconds(hosts, bytes, s.link);
    }
    let step_s = s.step_s.max(wire_free);
    let grad_bytes: f64 = timeline.iter().map(|(b, _)| b).sum();
    Prediction {
        hosts,
        whole: AllReduceAlgo::ALL
            .iter()
            .map(|&a| (a, a.seconds(hosts, grad_bytes, s.link)))
            .collect(),
        algo,
        step_s,
        exposed_s: step_s - s.step_s,
    }
}

/// The table `dtrain bench --simulate` prints.
pub fn report(s: &Scenario, hosts: &[usize]) -> String {
    let gbit = s.link.bytes_per_s * 8.0 / 1e9;
    let mut out = format!(
        "# VGG11 DDP on N hosts (model): {gbit} Gbit/s, {:.0} us latency, one-process step {:.0} ms \
         ({:.0} % backward), batch {} per host\n",
        s.link.latency_s * 1e6,
        s.step_s * 1e3,
        s.backward_share * 100.0,
        s.batch
    );
    out.push_str(&format!(
        "{:>6} {:>10} {:>12} {:>10} {:>18} {:>10} {:>11} {:>10}\n",
        "hosts",
        "ring ms",
        "halv-dbl ms",
        "tree ms",
        "DDP uses",
        "step ms",
        "exposed ms",
        "efficiency"
    ));
    for &n in hosts {
        let p = predict(s, n);
        let whole = |a: AllReduceAlgo| {
            p.whole
                .iter()
                .find(|(x, _)| *x == a)
                .map_or(0.0, |(_, t)| t * 1e3)
        };
        out.push_str(&format!(
            "{n:>6} {:>10.1} {:>12.1} {:>10.1} {:>18} {:>10.1} {:>11.1} {:>10.3}\n",
            whole(AllReduceAlgo::Ring),
            whole(AllReduceAlgo::HalvingDoubling),
            whole(AllReduceAlgo::Tree),
            p.algo.name(),
            p.step_s * 1e3,
            p.exposed_s * 1e3,
            p.efficiency(s.step_s),
        ));
    }
    out
}

/// The host counts of the table: 2..=1024, powers of two and a few between.
pub const HOSTS: [usize; 14] = [2, 3, 4, 6, 8, 12, 16, 32, 64, 100, 128, 256, 512, 1024];

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(gbit: f64) -> Scenario {
        Scenario {
            link: Link {
                latency_s: 50e-6,
                bytes_per_s: gbit * 1e9 / 8.0,
            },
            step_s: 0.65,
            backward_share: 0.65,
            batch: 128,
            first_bucket_mb: crate::config::DEFAULT_FIRST_BUCKET_MB,
            bucket_cap_mb: crate::config::DEFAULT_BUCKET_CAP_MB,
        }
    }

    #[test]
    fn buckets_cover_the_gradient_and_get_ready_during_backward() {
        let s = scenario(10.0);
        let t = bucket_timeline(&s);
        let bytes: f64 = t.iter().map(|(b, _)| b).sum();
        let params = Vgg::<f32>::new(VggConfig::vgg11(), 0).num_params();
        assert_eq!(bytes, params as f64 * 4.0);
        let forward = s.step_s * (1.0 - s.backward_share);
        assert!(t.windows(2).all(|w| w[0].1 <= w[1].1), "{t:?}");
        assert!(
            t[0].1 >= forward && t[t.len() - 1].1 <= s.step_s + 1e-12,
            "{t:?}"
        );
        // The last bucket (conv1/conv2) is ready at the end of backward.
        assert!((t[t.len() - 1].1 - s.step_s).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn a_fast_link_hides_the_wire_and_a_slow_one_does_not() {
        let fast = predict(&scenario(100.0), 2);
        assert!(fast.exposed_s < 0.005, "{fast:?}");
        let slow = predict(&scenario(0.1), 2);
        assert!(slow.exposed_s > 1.0, "{slow:?}");
        // More hosts never make the ring's step faster on the same link.
        let s = scenario(1.0);
        let steps: Vec<f64> = [2, 3, 5, 9]
            .iter()
            .map(|&n| predict(&s, n).step_s)
            .collect();
        assert!(steps.windows(2).all(|w| w[0] <= w[1] + 1e-12), "{steps:?}");
        assert!(report(&s, &HOSTS).lines().count() == HOSTS.len() + 2);
    }
}
