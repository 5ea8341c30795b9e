//! DDP: gradients grouped into buckets, each bucket averaged with an asynchronous all-reduce
//! launched during backward as soon as its last gradient is final.
//!
//! The bucket plan is [`BucketPlan`] (which parameter goes where; built by
//! [`BucketPlan::by_size`] from [`plan_buckets`]); the per-step machinery that fills buckets
//! from the engine's grad-ready hook, waits for them and steps the optimizer is [`DdpSync`].
//!
//! Bucketing follows PyTorch's `DistributedDataParallel`: parameters are taken in *reverse*
//! order (the order backward produces their gradients), a bucket is closed as soon as its
//! byte size reaches its cap (so the last gradient added may push it over), the first
//! bucket's cap is small (`--first-bucket-mb`, PyTorch's 1 MiB) so communication starts
//! early, and every later bucket uses `--bucket-cap-mb` (PyTorch's 25 MiB).

use std::time::Instant;

use engine::autograd::Param;
use engine::optim::Sgd;
use engine::vgg::Vgg;
use transport::{AsyncCommunicator, Buffer, Pending, ReduceOp};

use crate::data::Batch;
use crate::sync::{self, Peers, StepStats, SyncError};

/// One bucket of the plan: which parameters it holds and where each one's gradient lives
/// inside the bucket's flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Parameter indices, in the order they were added (descending index).
    pub params: Vec<usize>,
    /// `offsets[k]` is where `params[k]`'s gradient starts in the flat buffer (elements).
    pub offsets: Vec<usize>,
    /// Total elements in the bucket.
    pub len: usize,
}

/// Group parameters into buckets.
///
/// `param_lens[i]` is parameter `i`'s element count, `elem_bytes` the size of one element,
/// `first_cap_bytes` the first bucket's cap and `cap_bytes` every later bucket's cap. A cap
/// of 0 puts every parameter in its own bucket. Returns buckets in launch order.
pub fn plan_buckets(
    param_lens: &[usize],
    elem_bytes: usize,
    first_cap_bytes: usize,
    cap_bytes: usize,
) -> Vec<Bucket> {
    let mut buckets = Vec::new();
    let mut current = Bucket {
        params: Vec::new(),
        offsets: Vec::new(),
        len: 0,
    };
    for (index, &len) in param_lens.iter().enumerate().rev() {
        current.params.push(index);
        current.offsets.push(current.len);
        current.len += len;
        let cap = if buckets.is_empty() {
            first_cap_bytes
        } else {
            cap_bytes
        };
        if current.len * elem_bytes >= cap {
            buckets.push(std::mem::replace(
                &mut current,
                Bucket {
                    params: Vec::new(),
                    offsets: Vec::new(),
                    len: 0,
                },
            ));
        }
    }
    if !current.params.is_empty() {
        buckets.push(current);
    }
    buckets
}

/// Megabytes (MiB, as PyTorch's `bucket_cap_mb`) to bytes, rejecting negative/NaN values.
pub fn mib_to_bytes(mib: f64) -> usize {
    if mib.is_finite() && mib > 0.0 {
        (mib * 1024.0 * 1024.0) as usize
    } else {
        0
    }
}

/// Which parameter's gradient goes where: buckets in launch order and, per parameter, its
/// bucket and offset. Every rank must build the same plan (it decides the collectives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketPlan {
    buckets: Vec<Bucket>,
    /// Parameter index → (bucket, offset of its gradient in the bucket buffer).
    slot_of_param: Vec<(usize, usize)>,
}

impl BucketPlan {
    /// PyTorch's plan: buckets of about `first_bucket_mb`, then `bucket_cap_mb` each, filled
    /// in reverse parameter order (see [`plan_buckets`]).
    pub fn by_size(model: &Vgg<f32>, first_bucket_mb: f64, bucket_cap_mb: f64) -> BucketPlan {
        let lens: Vec<usize> = model.params().iter().map(|p| p.value.len()).collect();
        let buckets = plan_buckets(
            &lens,
            std::mem::size_of::<f32>(),
            mib_to_bytes(first_bucket_mb),
            mib_to_bytes(bucket_cap_mb),
        );
        BucketPlan::new(buckets, lens.len())
    }

    /// A plan from explicit buckets covering parameters `0..num_params` once each.
    fn new(buckets: Vec<Bucket>, num_params: usize) -> BucketPlan {
        let mut slot_of_param = vec![(0, 0); num_params];
        for (b, bucket) in buckets.iter().enumerate() {
            for (&p, &off) in bucket.params.iter().zip(&bucket.offsets) {
                slot_of_param[p] = (b, off);
            }
        }
        BucketPlan {
            buckets,
            slot_of_param,
        }
    }

    /// The buckets, in launch order.
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// (bucket, offset in its buffer) of parameter `param`'s gradient.
    pub fn slot(&self, param: usize) -> (usize, usize) {
        self.slot_of_param[param]
    }
}

/// DDP for one rank: its communication thread, the bucket plan, one reusable flat buffer
/// per bucket, and the all-reduces in flight.
///
/// [`DdpSync::step`] runs a whole step: rank 0's batch-norm buffers (PyTorch's
/// `broadcast_buffers=True`), forward, backward with [`DdpSync::on_grad_ready`] as the
/// engine's grad-ready hook, [`DdpSync::finish`], then the optimizer step.
///
/// Buckets are launched strictly in plan order (bucket k only after buckets 0..k), as PyTorch
/// does: every rank then issues the same collectives in the same order whatever order the
/// engine reports gradients in.
pub struct DdpSync {
    comm: AsyncCommunicator,
    plan: BucketPlan,
    /// A bucket's buffer when not in flight (allocated once by the transport — in shared
    /// memory on one host, so peers reduce it in place — handed to the communication thread
    /// and given back by `Pending::wait`).
    buffers: Vec<Option<Buffer<f32>>>,
    in_flight: Vec<Option<Pending<Buffer<f32>>>>,
    /// Gradients still missing per bucket in this step.
    missing: Vec<usize>,
    next_launch: usize,
    /// Batch-norm buffers packed for the per-step broadcast (reused).
    bn_flat: Vec<f32>,
}

impl DdpSync {
    /// Collective: allocates the bucket buffers through `comm` (same plan on every rank).
    pub fn new(
        comm: AsyncCommunicator,
        model: &Vgg<f32>,
        first_bucket_mb: f64,
        bucket_cap_mb: f64,
    ) -> transport::Result<DdpSync> {
        let plan = BucketPlan::by_size(model, first_bucket_mb, bucket_cap_mb);
        let buffers = plan
            .buckets()
            .iter()
            .map(|b| comm.alloc_buffer::<f32>(b.len).map(Some))
            .collect::<transport::Result<_>>()?;
        let in_flight = plan.buckets().iter().map(|_| None).collect();
        let missing = plan.buckets().iter().map(|b| b.params.len()).collect();
        Ok(DdpSync {
            comm,
            plan,
            buffers,
            in_flight,
            missing,
            next_launch: 0,
            bn_flat: Vec::new(),
        })
    }

    /// The communication thread (for collectives outside the step, queued after it).
    pub fn comm(&self) -> &AsyncCommunicator {
        &self.comm
    }

    /// The bucket plan.
    pub fn plan(&self) -> &BucketPlan {
        &self.plan
    }

    /// Buckets launched so far in this step.
    pub fn launched(&self) -> usize {
        self.next_launch
    }

    /// One training step (see the type's docs).
    pub fn step(
        &mut self,
        model: &mut Vgg<f32>,
        sgd: &mut Sgd<f32>,
        batch: &Batch,
    ) -> Result<StepStats, SyncError> {
        let t = Instant::now();
        sync::broadcast_bn_buffers(Peers::Async(&self.comm), model, &mut self.bn_flat)?;
        let mut comm_time = t.elapsed();
        self.begin_step();
        let loss = sync::forward_backward(model, batch, &mut |i, g| self.on_grad_ready(i, g));
        let t = Instant::now();
        // Wait for every bucket even when the batch was rejected, so no collective is left
        // half-done.
        let finished = self.finish(model.params_mut());
        comm_time += t.elapsed();
        let loss = loss?;
        finished?;
        sgd.step(model.params_mut());
        Ok(StepStats { loss, comm_time })
    }

    pub fn begin_step(&mut self) {
        for (m, b) in self.missing.iter_mut().zip(self.plan.buckets()) {
            *m = b.params.len();
        }
        self.next_launch = 0;
    }

    /// The engine's grad-ready hook: copy the gradient into its bucket and launch every
    /// bucket that is now complete (in plan order).
    pub fn on_grad_ready(&mut self, param: usize, grad: &[f32]) {
        let (b, off) = self.plan.slot(param);
        if let Some(buf) = self.buffers[b].as_mut() {
            buf[off..off + grad.len()].copy_from_slice(grad);
        }
        self.missing[b] = self.missing[b].saturating_sub(1);
        self.launch_ready(false);
    }

    /// Launch buckets in order while the next one is complete (or all, when `force`).
    fn launch_ready(&mut self, force: bool) {
        let buckets = self.plan.buckets().len();
        while self.next_launch < buckets && (force || self.missing[self.next_launch] == 0) {
            let b = self.next_launch;
            if let Some(buf) = self.buffers[b].take() {
                self.in_flight[b] = Some(self.comm.all_reduce_async(buf, ReduceOp::Avg));
            }
            self.next_launch += 1;
        }
    }

    /// Launch what is left (parameters that got no gradient keep the one already in their
    /// bucket slot... i.e. their stale values, as PyTorch without `find_unused_parameters`),
    /// wait for every bucket, and copy the averaged gradients into the parameters.
    pub fn finish(&mut self, params: &mut [Param<f32>]) -> transport::Result<()> {
        self.launch_ready(true);
        let mut first_error = None;
        for b in 0..self.plan.buckets().len() {
            let Some(pending) = self.in_flight[b].take() else {
                continue;
            };
            let bucket = &self.plan.buckets()[b];
            match pending.wait() {
                Ok(buf) => {
                    for (&p, &off) in bucket.params.iter().zip(&bucket.offsets) {
                        let g = &mut params[p].grad;
                        let n = g.len();
                        g.copy_from_slice(&buf[off..off + n]);
                    }
                    self.buffers[b] = Some(buf);
                }
                Err(e) => {
                    // Keep going so no bucket is left in flight; allocate a fresh buffer so
                    // the state stays usable (the run is about to end anyway).
                    self.buffers[b] = Some(Buffer::heap(bucket.len));
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks every invariant of a plan against the inputs it was built from.
    fn check_plan(lens: &[usize], elem: usize, first: usize, cap: usize, plan: &[Bucket]) {
        // Every parameter exactly once, in reverse order across the buckets.
        let order: Vec<usize> = plan.iter().flat_map(|b| b.params.clone()).collect();
        let expected: Vec<usize> = (0..lens.len()).rev().collect();
        assert_eq!(order, expected);
        for (bi, b) in plan.iter().enumerate() {
            assert!(!b.params.is_empty());
            // Offsets are the running sum of lengths.
            let mut off = 0;
            for (k, &p) in b.params.iter().enumerate() {
                assert_eq!(b.offsets[k], off);
                off += lens[p];
            }
            assert_eq!(b.len, off);
            let cap_b = if bi == 0 { first } else { cap };
            // Only the last parameter may push a bucket to or over its cap...
            let before_last = b.len - lens[*b.params.last().unwrap()];
            assert!(before_last * elem < cap_b || b.params.len() == 1);
            // ...and every bucket but the last reached its cap.
            if bi + 1 < plan.len() {
                assert!(b.len * elem >= cap_b);
            }
        }
    }

    #[test]
    fn vgg11_like_plan_has_small_first_bucket() {
        // conv(w,b), bn(w,b) x2, then linear(w,b), as VGG's parameter list.
        let lens = [1728, 64, 64, 64, 73728, 128, 128, 128, 5120, 10];
        let plan = plan_buckets(&lens, 4, 21_500, 200_000);
        check_plan(&lens, 4, 21_500, 200_000, &plan);
        // Reverse order: 10 + 5120 + 128 + 128 = 5386 elems = 21544 B >= 21500 closes bucket 0.
        assert_eq!(plan[0].params, vec![9, 8, 7, 6]);
        assert_eq!(plan[0].offsets, vec![0, 10, 5130, 5258]);
        // (128 + 73728) * 4 = 295424 B >= 200000 closes bucket 1.
        assert_eq!(plan[1].params, vec![5, 4]);
        assert_eq!(plan[2].params, vec![3, 2, 1, 0]);
        assert_eq!(plan.len(), 3);
    }

    #[test]
    fn zero_cap_gives_one_bucket_per_param_and_huge_cap_one_bucket() {
        let lens = [3, 1, 4, 1, 5];
        let each = plan_buckets(&lens, 4, 0, 0);
        check_plan(&lens, 4, 0, 0, &each);
        assert_eq!(each.len(), 5);
        let one = plan_buckets(&lens, 4, usize::MAX, usize::MAX);
        check_plan(&lens, 4, usize::MAX, usize::MAX, &one);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].len, 14);
        assert!(plan_buckets(&[], 4, 1, 1).is_empty());
    }

    #[test]
    fn random_plans_satisfy_invariants() {
        // A small deterministic LCG: many shapes, every invariant checked.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % m
        };
        for _ in 0..200 {
            let n = next(30) as usize;
            let lens: Vec<usize> = (0..n).map(|_| 1 + next(5000) as usize).collect();
            let first = next(20_000) as usize;
            let cap = next(60_000) as usize;
            let plan = plan_buckets(&lens, 4, first, cap);
            check_plan(&lens, 4, first, cap, &plan);
        }
    }

    #[test]
    fn mib_conversion() {
        assert_eq!(mib_to_bytes(1.0), 1 << 20);
        assert_eq!(mib_to_bytes(25.0), 25 << 20);
        assert_eq!(mib_to_bytes(0.5), 1 << 19);
        assert_eq!(mib_to_bytes(-1.0), 0);
        assert_eq!(mib_to_bytes(f64::NAN), 0);
    }

    /// A one-rank backend whose all-reduce doubles every f32: shows where each bucket's
    /// result lands.
    struct Doubling;
    impl transport::Backend for Doubling {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn all_reduce(
            &mut self,
            buf: &mut [u8],
            _: transport::DType,
            _: ReduceOp,
        ) -> transport::Result<()> {
            for c in buf.chunks_exact_mut(4) {
                let v = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]) * 2.0;
                c.copy_from_slice(&v.to_ne_bytes());
            }
            Ok(())
        }
        fn broadcast(&mut self, _: &mut [u8], _: usize) -> transport::Result<()> {
            Ok(())
        }
        fn gather(&mut self, _: &[u8], _: Option<&mut [u8]>, _: usize) -> transport::Result<()> {
            unreachable!("not used by DDP")
        }
        fn scatter(&mut self, _: Option<&[u8]>, _: &mut [u8], _: usize) -> transport::Result<()> {
            unreachable!("not used by DDP")
        }
        fn all_gather(&mut self, _: &[u8], _: &mut [u8]) -> transport::Result<()> {
            unreachable!("not used by DDP")
        }
        fn reduce_scatter(
            &mut self,
            _: &[u8],
            _: &mut [u8],
            _: transport::DType,
            _: ReduceOp,
        ) -> transport::Result<()> {
            unreachable!("not used by DDP")
        }
        fn barrier(&mut self) -> transport::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buckets_launch_during_backward_and_results_land_on_the_right_parameters() {
        let mut model = crate::train::build_model("4,M,8,M", 2).expect("model");
        // Tiny caps: several buckets (the 8x4x3x3 conv weight alone is 1152 bytes).
        let comm = transport::Communicator::from_backend(Box::new(Doubling), "test").into_async();
        let mut ddp = DdpSync::new(comm, &model, 0.0005, 0.001).expect("buffers");
        let buckets = ddp.plan().buckets().len();
        assert!(buckets >= 3, "{:?}", ddp.plan());
        let n = 2;
        let x: Vec<f32> = (0..n * 3 * 32 * 32)
            .map(|i| ((i * 29 % 97) as f32) / 48.0 - 1.0)
            .collect();
        for step in 0..2 {
            ddp.begin_step();
            assert_eq!(ddp.launched(), 0);
            model
                .forward_backward(&x, n, &[1, 4], &mut |i, g| ddp.on_grad_ready(i, g))
                .expect("forward_backward");
            // Every bucket was launched from inside backward, none waits for `finish`.
            assert_eq!(ddp.launched(), buckets, "step {step}");
            let local: Vec<Vec<f32>> = model.params().iter().map(|p| p.grad.clone()).collect();
            ddp.finish(model.params_mut()).expect("finish");
            for (p, g) in model.params().iter().zip(&local) {
                let doubled: Vec<f32> = g.iter().map(|v| v * 2.0).collect();
                assert_eq!(p.grad, doubled, "{}", p.name);
            }
        }
    }
}
