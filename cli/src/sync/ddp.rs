//! DDP: gradients grouped into buckets, each bucket averaged by an asynchronous all-reduce
//! launched during backward the moment its last gradient is final, and each bucket's
//! parameters stepped by the optimizer the moment its average has landed.
//!
//! - [`plan_buckets`] / [`BucketPlan`]: which parameter's gradient goes into which bucket.
//! - [`DdpSync`]: one rank's step — fill buckets from the engine's grad-ready hook, launch
//!   them in plan order, wait for them in that order, step each bucket's parameters.
//! - [`WireFormat`]: what a bucket holds on the wire: f32, or bf16/fp16
//!   (`--grad-compression`, half the bytes).
//!
//! # The bucket plan: from when gradients become ready
//!
//! A bucket's all-reduce can start only once its *last* gradient is final, so the plan is
//! made in the order backward finishes gradients: reverse parameter order for the VGGs
//! dtrain builds (the classifier first, then conv blocks from the top; within a block the
//! batch-norm parameters just before the conv's). The rule needs no timing, so every rank
//! computes the same plan from the parameter sizes and the two flags:
//! - a bucket is closed as soon as it holds at least `--first-bucket-mb` (1 MiB) of
//!   gradients: a gradient of that size or more is always the last of its bucket, so it
//!   never waits for gradients that become ready after it; smaller ones (biases, batch-norm
//!   parameters, small layers) ride with the next gradient, so no collective is spent on a
//!   few kilobytes;
//! - a bucket never grows past `--bucket-cap-mb` (25 MiB) by merging: a parameter that would
//!   take a non-empty bucket over the cap starts the next one (a parameter bigger than the
//!   cap is a bucket of its own).
//!
//! Sizes are those of the f32 gradients (as PyTorch's `bucket_cap_mb`), whatever
//! `--grad-compression` puts on the wire, so compression does not change the plan.
//!
//! What this buys: with a link of any rate, the bytes still unsent when backward ends are
//! at most `--first-bucket-mb` more than with one bucket per parameter, which is the least
//! any plan can leave (see `plan_tail_is_within_min_bytes_of_the_finest_plan` in the tests).
//! For VGG11 it is one bucket per conv layer from conv8 down to conv3 and one for conv2 and
//! conv1, instead of PyTorch's rule (buckets that close only when they *reach* 25 MiB), whose
//! second bucket held conv7 down to conv4 (26 MB) and launched three quarters into backward.
//!
//! Buckets are launched strictly in plan order (bucket k only after buckets 0..k), as
//! PyTorch does: every rank then issues the same collectives in the same order whatever
//! order the engine reports gradients in. [`DdpSync::new`] checks that every rank built the
//! same plan (a digest, all-gathered once), so a mismatch is an error, not a hang.
//!
//! # Optimizer overlap
//!
//! After backward, buckets are waited for in launch order and each one's parameters are
//! stepped ([`Sgd::step_param`]) as soon as its average lands, while later buckets are
//! still on the wire; the step ends when the last bucket lands and its few parameters are
//! stepped. SGD updates every parameter independently, so this is bit for bit the same as
//! one `Sgd::step` after all buckets ([`DdpSync::set_optimizer_overlap`] turns it off; the
//! tests compare the two).
//!
//! # Compression
//!
//! With `--grad-compression bf16|fp16` (PyTorch's `bf16_compress_hook` /
//! `fp16_compress_hook`), bucket buffers hold 16-bit floats: each gradient is multiplied by
//! 1/world in f32 and rounded straight into the bucket's wire buffer, the buffer is
//! all-reduced with `Sum` (every hop widens to f32, adds, rounds back to 16 bits; identical
//! bits on every rank), and the result is widened (exactly) into the parameters' gradients.
//! Dividing *before* the sum, as PyTorch's hooks do, means no partial sum can overflow
//! fp16's ±65504 unless the average itself does; the price is that gradients below
//! 2^-24·world (fp16's smallest subnormal times the world size) round to zero. PyTorch
//! rounds first and divides in 16 bits; dtrain divides in f32, then rounds once.

use std::time::{Duration, Instant};

use engine::autograd::Param;
use engine::optim::Sgd;
use engine::vgg::Vgg;
use transport::{AsyncCommunicator, Bf16, Buffer, Element, HalfFloat, Pending, ReduceOp, F16};

use super::step::{self, Peers, StepStats, SyncError};
use crate::config::GradCompression;
use crate::data::Batch;

/// One bucket of the plan: which parameters it holds and where each one's gradient lives
/// inside the bucket's flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Parameter indices, in the order they were added (descending index: ready order).
    pub params: Vec<usize>,
    /// `offsets[k]` is where `params[k]`'s gradient starts in the flat buffer (elements).
    pub offsets: Vec<usize>,
    /// Total elements in the bucket.
    pub len: usize,
}

impl Bucket {
    fn empty() -> Bucket {
        Bucket {
            params: Vec::new(),
            offsets: Vec::new(),
            len: 0,
        }
    }

    fn push(&mut self, param: usize, len: usize) {
        self.params.push(param);
        self.offsets.push(self.len);
        self.len += len;
    }
}

/// Group parameters into buckets in the order backward finishes their gradients (reverse
/// index; see the module docs for the rule).
///
/// `param_lens[i]` is parameter `i`'s element count and `elem_bytes` the size of one
/// element. A bucket is closed once it holds at least `min_bytes`, and a parameter that
/// would take a non-empty bucket above `cap_bytes` starts a new one. Returns buckets in
/// launch order.
pub fn plan_buckets(
    param_lens: &[usize],
    elem_bytes: usize,
    min_bytes: usize,
    cap_bytes: usize,
) -> Vec<Bucket> {
    let bytes = |elems: usize| elems.saturating_mul(elem_bytes);
    let mut buckets = Vec::new();
    let mut current = Bucket::empty();
    for (index, &len) in param_lens.iter().enumerate().rev() {
        if !current.params.is_empty() && bytes(current.len + len) > cap_bytes {
            buckets.push(std::mem::replace(&mut current, Bucket::empty()));
        }
        current.push(index, len);
        if bytes(current.len) >= min_bytes {
            buckets.push(std::mem::replace(&mut current, Bucket::empty()));
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
    /// The plan for `model` (see the module docs): buckets closed once they hold
    /// `first_bucket_mb`, never merged past `bucket_cap_mb`, in gradient-ready order.
    pub fn for_model(model: &Vgg<f32>, first_bucket_mb: f64, bucket_cap_mb: f64) -> BucketPlan {
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

    /// A digest of the whole plan (parameters, offsets and lengths of every bucket), equal
    /// on every rank that built the same plan.
    pub fn digest(&self) -> u64 {
        let mut h = crate::hash::Fnv1a::default();
        for b in &self.buckets {
            h.update(&(b.params.len() as u64).to_le_bytes());
            for (&p, &off) in b.params.iter().zip(&b.offsets) {
                h.update(&(p as u64).to_le_bytes());
                h.update(&(off as u64).to_le_bytes());
            }
            h.update(&(b.len as u64).to_le_bytes());
        }
        h.finish()
    }
}

/// What a bucket holds on the wire and how gradients get in and out of it.
pub trait WireFormat: Element + Copy {
    /// The all-reduce that turns the packed buffers into the average.
    const REDUCE: ReduceOp;
    /// Writes `grad` into `dst` (same length) ready for [`WireFormat::REDUCE`];
    /// `inv_world` is 1 / world size.
    fn pack(grad: &[f32], inv_world: f32, dst: &mut [Self]);
    /// Writes the reduced `src` into `grad` (same length): the averaged gradient.
    fn unpack(src: &[Self], grad: &mut [f32]);
}

/// f32: the exact gradients; the transport's `Avg` divides once after the sum.
impl WireFormat for f32 {
    const REDUCE: ReduceOp = ReduceOp::Avg;
    fn pack(grad: &[f32], _inv_world: f32, dst: &mut [f32]) {
        dst.copy_from_slice(grad);
    }
    fn unpack(src: &[f32], grad: &mut [f32]) {
        grad.copy_from_slice(src);
    }
}

/// 16-bit formats: `grad · (1/world)` in f32, rounded once, then summed.
macro_rules! half_wire_format {
    ($t:ty) => {
        impl WireFormat for $t {
            const REDUCE: ReduceOp = ReduceOp::Sum;
            fn pack(grad: &[f32], inv_world: f32, dst: &mut [$t]) {
                pack_half(grad, inv_world, dst);
            }
            fn unpack(src: &[$t], grad: &mut [f32]) {
                <$t as HalfFloat>::decode(src, grad);
            }
        }
    };
}
half_wire_format!(Bf16);
half_wire_format!(F16);

/// `dst[i] = H::from_f32(grad[i] * inv_world)`, in L1-sized pieces (one pass over memory).
pub fn pack_half<H: HalfFloat>(grad: &[f32], inv_world: f32, dst: &mut [H]) {
    const PIECE: usize = 1024;
    assert_eq!(grad.len(), dst.len(), "pack_half: length mismatch");
    let mut scaled = [0.0f32; PIECE];
    for (g, d) in grad.chunks(PIECE).zip(dst.chunks_mut(PIECE)) {
        let s = &mut scaled[..g.len()];
        for (s, &g) in s.iter_mut().zip(g) {
            *s = g * inv_world;
        }
        H::encode(s, d);
    }
}

/// The buckets' buffers of one wire format: each either here (being filled, or holding the
/// last result) or in flight on the communication thread.
struct WireBuckets<W: WireFormat> {
    /// A bucket's buffer when not in flight (allocated once by the transport — in shared
    /// memory on one host, so peers reduce it in place — handed to the communication thread
    /// and given back by `Pending::wait`).
    buffers: Vec<Option<Buffer<W>>>,
    in_flight: Vec<Option<Pending<Buffer<W>>>>,
    inv_world: f32,
}

/// [`WireBuckets`] of any format, as [`DdpSync`] drives them.
trait BucketBuffers: Send {
    /// Write `grad` into bucket `b` at element `offset`.
    fn store(&mut self, b: usize, offset: usize, grad: &[f32]);
    /// Start bucket `b`'s all-reduce.
    fn launch(&mut self, b: usize, comm: &AsyncCommunicator);
    /// Wait for bucket `b`'s all-reduce, if it is in flight; on error the bucket gets a
    /// fresh buffer (so the state stays usable) and the error is returned.
    fn wait(&mut self, b: usize, len: usize) -> transport::Result<()>;
    /// Write bucket `b`'s averaged gradients into its parameters.
    fn unpack(&self, b: usize, bucket: &Bucket, params: &mut [Param<f32>]);
}

impl<W: WireFormat> WireBuckets<W> {
    fn new(comm: &AsyncCommunicator, plan: &BucketPlan) -> transport::Result<Self> {
        let buffers = plan
            .buckets()
            .iter()
            .map(|b| comm.alloc_buffer::<W>(b.len).map(Some))
            .collect::<transport::Result<_>>()?;
        Ok(WireBuckets {
            buffers,
            in_flight: plan.buckets().iter().map(|_| None).collect(),
            inv_world: 1.0 / comm.world_size() as f32,
        })
    }
}

impl<W: WireFormat> BucketBuffers for WireBuckets<W> {
    fn store(&mut self, b: usize, offset: usize, grad: &[f32]) {
        if let Some(buf) = self.buffers[b].as_mut() {
            W::pack(grad, self.inv_world, &mut buf[offset..offset + grad.len()]);
        }
    }

    fn launch(&mut self, b: usize, comm: &AsyncCommunicator) {
        if let Some(buf) = self.buffers[b].take() {
            self.in_flight[b] = Some(comm.all_reduce_async(buf, W::REDUCE));
        }
    }

    fn wait(&mut self, b: usize, len: usize) -> transport::Result<()> {
        let Some(pending) = self.in_flight[b].take() else {
            return Ok(());
        };
        match pending.wait() {
            Ok(buf) => {
                self.buffers[b] = Some(buf);
                Ok(())
            }
            Err(e) => {
                self.buffers[b] = Some(Buffer::heap(len));
                Err(e)
            }
        }
    }

    fn unpack(&self, b: usize, bucket: &Bucket, params: &mut [Param<f32>]) {
        let Some(buf) = self.buffers[b].as_ref() else {
            return;
        };
        for (&p, &off) in bucket.params.iter().zip(&bucket.offsets) {
            let g = &mut params[p].grad;
            let n = g.len();
            W::unpack(&buf[off..off + n], g);
        }
    }
}

/// DDP for one rank: its communication thread, the bucket plan, one reusable flat buffer
/// per bucket (in the `--grad-compression` format), and the all-reduces in flight.
///
/// [`DdpSync::step`] runs a whole step: rank 0's batch-norm buffers (PyTorch's
/// `broadcast_buffers=True`), forward, backward with [`DdpSync::on_grad_ready`] as the
/// engine's grad-ready hook, then [`DdpSync::finish`], which waits for each bucket and steps
/// its parameters.
pub struct DdpSync {
    comm: AsyncCommunicator,
    plan: BucketPlan,
    buffers: Box<dyn BucketBuffers>,
    /// Gradients still missing per bucket in this step.
    missing: Vec<usize>,
    next_launch: usize,
    /// Step each bucket's parameters as soon as it lands (else one step after all).
    overlap_optimizer: bool,
    /// Batch-norm buffers packed for the per-step broadcast (reused).
    bn_flat: Vec<f32>,
    /// Issue the batch-norm broadcast before forward and apply it after (the default), or
    /// wait for it before forward. Both give the same bits.
    overlap_bn_broadcast: bool,
}

impl DdpSync {
    /// Collective: checks that every rank built the same plan and allocates the bucket
    /// buffers through `comm`.
    pub fn new(
        comm: AsyncCommunicator,
        model: &Vgg<f32>,
        first_bucket_mb: f64,
        bucket_cap_mb: f64,
        compression: GradCompression,
    ) -> transport::Result<DdpSync> {
        let plan = BucketPlan::for_model(model, first_bucket_mb, bucket_cap_mb);
        check_same_plan_everywhere(&comm, &plan, compression)?;
        let buffers: Box<dyn BucketBuffers> = match compression {
            GradCompression::None => Box::new(WireBuckets::<f32>::new(&comm, &plan)?),
            GradCompression::Bf16 => Box::new(WireBuckets::<Bf16>::new(&comm, &plan)?),
            GradCompression::Fp16 => Box::new(WireBuckets::<F16>::new(&comm, &plan)?),
        };
        let missing = plan.buckets().iter().map(|b| b.params.len()).collect();
        Ok(DdpSync {
            comm,
            plan,
            buffers,
            missing,
            next_launch: 0,
            overlap_optimizer: true,
            bn_flat: Vec::new(),
            overlap_bn_broadcast: true,
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

    /// Whether [`DdpSync::step`] steps each bucket's parameters as soon as the bucket lands
    /// (the default) or all parameters after the last bucket. Both give the same bits.
    pub fn set_optimizer_overlap(&mut self, on: bool) {
        self.overlap_optimizer = on;
    }

    /// Whether [`DdpSync::step`] lets forward run while rank 0's batch-norm buffers are on
    /// the wire (the default) or waits for them first. Both give the same bits.
    pub fn set_bn_broadcast_overlap(&mut self, on: bool) {
        self.overlap_bn_broadcast = on;
    }

    /// One training step (see the type's docs). `comm_time` is the time spent waiting for
    /// collectives (the batch-norm broadcast and buckets that had not landed yet), not the
    /// optimizer work done in between.
    ///
    /// A training forward normalizes with the batch's statistics and never reads the running
    /// ones, so rank 0's buffers need not be here before it: the broadcast is queued first,
    /// forward and backward run, and once it lands each layer's running statistics are
    /// recomputed from the broadcast values and this batch's statistics
    /// ([`engine::vgg::BnBuffers::rebase_running`]) — the bits the synchronous order gives.
    pub fn step(
        &mut self,
        model: &mut Vgg<f32>,
        sgd: &mut Sgd<f32>,
        batch: &Batch,
    ) -> Result<StepStats, SyncError> {
        let t = Instant::now();
        let mut bn_landed = Ok(());
        let bn_pending = if self.overlap_bn_broadcast {
            step::pack_bn_buffers(model, &mut self.bn_flat);
            Some(
                self.comm
                    .broadcast_async::<f32, _>(std::mem::take(&mut self.bn_flat), 0),
            )
        } else {
            step::broadcast_bn_buffers(Peers::Async(&self.comm), model, &mut self.bn_flat)?;
            None
        };
        let mut comm_time = t.elapsed();
        self.begin_step();
        let loss = step::forward_backward(model, batch, &mut |i, g| self.on_grad_ready(i, g));
        if let Some(pending) = bn_pending {
            let t = Instant::now();
            bn_landed = pending.wait().map(|flat| {
                // A rejected batch ran no batch norm: then the broadcast values are the
                // running statistics, as in the synchronous order.
                step::unpack_bn_buffers(model, &flat, loss.is_ok());
                self.bn_flat = flat;
            });
            comm_time += t.elapsed();
        }
        // Wait for every bucket even when the batch was rejected, so no collective is left
        // half-done; step only after a good batch.
        let good = loss.is_ok() && bn_landed.is_ok();
        let overlapped = (good && self.overlap_optimizer).then_some(&mut *sgd);
        let (waited, finished) = self.finish(model.params_mut(), overlapped);
        comm_time += waited;
        let loss = loss?;
        bn_landed?;
        finished?;
        if !self.overlap_optimizer {
            sgd.step(model.params_mut());
        }
        Ok(StepStats { loss, comm_time })
    }

    pub fn begin_step(&mut self) {
        for (m, b) in self.missing.iter_mut().zip(self.plan.buckets()) {
            *m = b.params.len();
        }
        self.next_launch = 0;
    }

    /// The engine's grad-ready hook: put the gradient into its bucket (in the wire format)
    /// and launch every bucket that is now complete (in plan order).
    pub fn on_grad_ready(&mut self, param: usize, grad: &[f32]) {
        let (b, off) = self.plan.slot(param);
        self.buffers.store(b, off, grad);
        self.missing[b] = self.missing[b].saturating_sub(1);
        self.launch_ready(false);
    }

    /// Launch buckets in order while the next one is complete (or all, when `force`).
    fn launch_ready(&mut self, force: bool) {
        let buckets = self.plan.buckets().len();
        while self.next_launch < buckets && (force || self.missing[self.next_launch] == 0) {
            self.buffers.launch(self.next_launch, &self.comm);
            self.next_launch += 1;
        }
    }

    /// Launch what is left (parameters that got no gradient keep what is already in their
    /// bucket slot, i.e. stale values, as PyTorch without `find_unused_parameters`), then
    /// per bucket in launch order: wait for it, write its averaged gradients into the
    /// parameters and, with `sgd`, step those parameters at once — while later buckets are
    /// still on the wire. After an error nothing more is stepped, but every bucket is still
    /// waited for. Returns the time spent waiting and the first error.
    pub fn finish(
        &mut self,
        params: &mut [Param<f32>],
        mut sgd: Option<&mut Sgd<f32>>,
    ) -> (Duration, transport::Result<()>) {
        self.launch_ready(true);
        let mut waited = Duration::ZERO;
        let mut first_error = None;
        for (b, bucket) in self.plan.buckets().iter().enumerate() {
            let t = Instant::now();
            let landed = self.buffers.wait(b, bucket.len);
            waited += t.elapsed();
            if let Err(e) = landed {
                first_error.get_or_insert(e);
            }
            if first_error.is_some() {
                continue;
            }
            self.buffers.unpack(b, bucket, params);
            if let Some(sgd) = sgd.as_deref_mut() {
                for &p in &bucket.params {
                    sgd.step_param(p, &mut params[p]);
                }
            }
        }
        (waited, first_error.map_or(Ok(()), Err))
    }
}

/// Every rank's plan digest (and wire format) must equal rank 0's: all-gathered once, so
/// every rank reports the same mismatch instead of mixing buckets of different layouts.
fn check_same_plan_everywhere(
    comm: &AsyncCommunicator,
    plan: &BucketPlan,
    compression: GradCompression,
) -> transport::Result<()> {
    let mut h = crate::hash::Fnv1a::default();
    h.update(&plan.digest().to_le_bytes());
    h.update(compression.name().as_bytes());
    let mine = h.finish() as i64;
    let world = comm.world_size();
    let all = comm.run(move |c| {
        let mut all = vec![0i64; world];
        c.all_gather(&[mine], &mut all)?;
        Ok(all)
    })?;
    match all.iter().position(|&d| d != all[0]) {
        None => Ok(()),
        Some(r) => Err(transport::Error::InvalidArgument(format!(
            "DDP bucket plans differ: rank {r} built {:#018x}, rank 0 {:#018x} (every rank needs \
             the same --model, --first-bucket-mb, --bucket-cap-mb and --grad-compression)",
            all[r] as u64, all[0] as u64
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks every invariant of a plan against the inputs it was built from.
    fn check_plan(lens: &[usize], elem: usize, min: usize, cap: usize, plan: &[Bucket]) {
        // Every parameter exactly once, in ready (reverse) order across the buckets.
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
            let last = *b.params.last().unwrap();
            // The bucket closed at the first parameter that brought it to `min`: everything
            // before its last parameter is below `min`, so a gradient of `min` bytes or more
            // is always the last of its bucket (it never waits for later-ready ones).
            let before_last = (b.len - lens[last]) * elem;
            assert!(
                b.params.len() == 1 || before_last < min,
                "bucket {bi}: {b:?}"
            );
            for &p in &b.params[..b.params.len() - 1] {
                assert!(
                    lens[p] * elem < min,
                    "big parameter {p} waits in bucket {bi}"
                );
            }
            // Merging never goes past the cap.
            assert!(
                b.params.len() == 1 || b.len * elem <= cap,
                "bucket {bi}: {b:?}"
            );
            // A bucket before the last one closed because it reached `min`, or because
            // the next parameter would have taken it over the cap.
            if let Some(next) = plan.get(bi + 1) {
                let next_first = lens[next.params[0]];
                assert!(b.len * elem >= min || (b.len + next_first) * elem > cap);
            }
        }
    }

    /// A small deterministic LCG.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, m: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % m
        }
    }

    #[test]
    fn vgg_like_plan_closes_buckets_at_the_minimum_size() {
        // conv(w,b), bn(w,b) x2, then linear(w,b), as VGG's parameter list.
        let lens = [1728, 64, 64, 64, 73728, 128, 128, 128, 5120, 10];
        let plan = plan_buckets(&lens, 4, 21_500, 400_000);
        check_plan(&lens, 4, 21_500, 400_000, &plan);
        // Ready order: 10 + 5120 + 128 + 128 = 5386 elements = 21544 B >= 21500 closes bucket 0.
        assert_eq!(plan[0].params, vec![9, 8, 7, 6]);
        assert_eq!(plan[0].offsets, vec![0, 10, 5130, 5258]);
        // 128 + 73728 elements: the conv weight closes bucket 1.
        assert_eq!(plan[1].params, vec![5, 4]);
        assert_eq!(plan[2].params, vec![3, 2, 1, 0]);
        assert_eq!(plan.len(), 3);
        // With a cap below bucket 1's 295424 bytes, the conv weight is a bucket of its own.
        let capped = plan_buckets(&lens, 4, 21_500, 200_000);
        check_plan(&lens, 4, 21_500, 200_000, &capped);
        assert_eq!(capped[1].params, vec![5]);
        assert_eq!(capped[2].params, vec![4]);
        assert_eq!(capped[3].params, vec![3, 2, 1, 0]);
    }

    #[test]
    fn tiny_minimum_gives_one_bucket_per_param_and_huge_minimum_one_bucket() {
        let lens = [3, 1, 4, 1, 5];
        let each = plan_buckets(&lens, 4, 0, usize::MAX);
        check_plan(&lens, 4, 0, usize::MAX, &each);
        assert_eq!(each.len(), 5);
        let capped = plan_buckets(&lens, 4, usize::MAX, 0);
        check_plan(&lens, 4, usize::MAX, 0, &capped);
        assert_eq!(capped.len(), 5);
        let one = plan_buckets(&lens, 4, usize::MAX, usize::MAX);
        check_plan(&lens, 4, usize::MAX, usize::MAX, &one);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].len, 14);
        assert!(plan_buckets(&[], 4, 1, 1).is_empty());
    }

    #[test]
    fn random_plans_satisfy_invariants() {
        let mut rng = Lcg(0x2545_f491_4f6c_dd1d);
        for _ in 0..300 {
            let n = rng.next(30) as usize;
            let lens: Vec<usize> = (0..n).map(|_| 1 + rng.next(5000) as usize).collect();
            let min = rng.next(20_000) as usize;
            let cap = rng.next(60_000) as usize;
            let plan = plan_buckets(&lens, 4, min, cap);
            check_plan(&lens, 4, min, cap, &plan);
        }
    }

    /// Elements still unsent when backward ends at `end`, for buckets launched in order
    /// when their last gradient is ready (`ready[p]`, non-decreasing in ready order) on a
    /// first-in-first-out link moving `rate` elements per unit of time.
    fn unsent_at(plan: &[Bucket], ready: &[f64], end: f64, rate: f64) -> f64 {
        let mut free_at = 0.0f64;
        let mut unsent = 0.0;
        for b in plan {
            let launch = b.params.iter().map(|&p| ready[p]).fold(0.0, f64::max);
            let start = free_at.max(launch);
            free_at = start + b.len as f64 / rate;
            unsent += if free_at <= end {
                0.0
            } else if start >= end {
                b.len as f64
            } else {
                (free_at - end) * rate
            };
        }
        unsent
    }

    /// The property the plan is built for: with any gradient sizes, ready times and link
    /// rate, what is unsent when backward ends is at most `min` more than with one bucket
    /// per parameter, which no plan beats (every plan in ready order is a coarsening of it).
    #[test]
    fn plan_tail_is_within_min_bytes_of_the_finest_plan() {
        let mut rng = Lcg(7);
        for case in 0..500 {
            let n = 1 + rng.next(40) as usize;
            let lens: Vec<usize> = (0..n).map(|_| 1 + rng.next(100_000) as usize).collect();
            // Ready times: reverse index order, random gaps (backward of each layer).
            let mut ready = vec![0.0; n];
            let mut t = 0.0;
            for p in (0..n).rev() {
                t += rng.next(1000) as f64;
                ready[p] = t;
            }
            let end = t + rng.next(100) as f64;
            let rate = (1 + rng.next(5000)) as f64; // elements per unit of time
            let min = rng.next(400_000) as usize; // bytes
            let cap = rng.next(800_000) as usize;
            let plan = plan_buckets(&lens, 4, min, cap);
            let finest = plan_buckets(&lens, 4, 0, 0);
            let best = unsent_at(&finest, &ready, end, rate);
            let ours = unsent_at(&plan, &ready, end, rate);
            let slack = (min / 4) as f64 + 1e-6 * lens.iter().sum::<usize>() as f64;
            assert!(
                ours <= best + slack,
                "case {case}: {ours} > {best} + {slack}"
            );
            // And any other plan in ready order (a random coarsening) is no better than the
            // finest.
            let other = plan_buckets(&lens, 4, rng.next(800_000) as usize, usize::MAX);
            assert!(unsent_at(&other, &ready, end, rate) >= best - 1e-6 * slack.max(1.0));
        }
    }

    #[test]
    fn vgg11_plan_is_one_bucket_per_big_conv_layer() {
        let model = crate::model::build_model("vgg11", 0).expect("vgg11");
        let plan = BucketPlan::for_model(&model, 1.0, 25.0);
        let names = |b: &Bucket| -> Vec<String> {
            b.params
                .iter()
                .map(|&p| model.params()[p].name.clone())
                .collect()
        };
        // Conv blocks are layers.{4k}.weight (conv) ... layers.{4k+1} (batch norm).
        let buckets: Vec<Vec<String>> = plan.buckets().iter().map(names).collect();
        assert_eq!(buckets.len(), 7, "{buckets:?}");
        // Bucket 0: the classifier and the top block; then one block each.
        assert_eq!(buckets[0][0], "fc1.bias");
        for (b, names) in buckets.iter().enumerate().take(6) {
            let last = names.last().unwrap();
            assert!(
                last.ends_with(".weight") && !last.starts_with("fc"),
                "{b}: {names:?}"
            );
            // One conv weight per bucket (and it is the bucket's last gradient).
            let conv_weights = names
                .iter()
                .filter(|n| {
                    let p = model.params().iter().find(|p| &&p.name == n).unwrap();
                    p.shape.len() == 4
                })
                .count();
            assert_eq!(conv_weights, 1, "{b}: {names:?}");
        }
        // The last bucket holds the two bottom blocks (conv2 and conv1: 0.3 MB).
        let last = plan.buckets().last().unwrap();
        assert!(last.len * 4 < 1 << 20, "{:?}", buckets[6]);
        assert_eq!(*last.params.last().unwrap(), 0);
    }

    #[test]
    fn digest_tells_plans_apart() {
        let lens = [1000, 10, 2000, 30];
        let a = BucketPlan::new(plan_buckets(&lens, 4, 4000, 1 << 20), 4);
        let b = BucketPlan::new(plan_buckets(&lens, 4, 16_000, 1 << 20), 4);
        assert_ne!(a.buckets(), b.buckets());
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), a.clone().digest());
    }

    #[test]
    fn mib_conversion() {
        assert_eq!(mib_to_bytes(1.0), 1 << 20);
        assert_eq!(mib_to_bytes(25.0), 25 << 20);
        assert_eq!(mib_to_bytes(0.5), 1 << 19);
        assert_eq!(mib_to_bytes(-1.0), 0);
        assert_eq!(mib_to_bytes(f64::NAN), 0);
    }

    #[test]
    fn pack_half_scales_in_f32_then_rounds_once() {
        let mut rng = Lcg(11);
        // Lengths around the piece size; values over many binades, both signs.
        for len in [0usize, 1, 1023, 1024, 1025, 3000] {
            let grad: Vec<f32> = (0..len)
                .map(|_| {
                    let m = rng.next(1 << 24) as f32 / (1 << 24) as f32 + 0.5;
                    let e = rng.next(40) as i32 - 30;
                    let s = if rng.next(2) == 0 { -1.0 } else { 1.0 };
                    s * m * 2f32.powi(e)
                })
                .collect();
            for inv in [1.0f32, 0.5, 1.0 / 3.0] {
                let mut bf = vec![Bf16::default(); len];
                pack_half(&grad, inv, &mut bf);
                let mut f16 = vec![F16::default(); len];
                pack_half(&grad, inv, &mut f16);
                for i in 0..len {
                    assert_eq!(bf[i], Bf16::from_f32(grad[i] * inv), "{len} {i}");
                    assert_eq!(f16[i], F16::from_f32(grad[i] * inv), "{len} {i}");
                }
            }
        }
    }

    /// A one-rank backend whose all-reduce doubles every element (in f32 for the 16-bit
    /// formats, rounded back): shows where each bucket's result lands.
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
            dtype: transport::DType,
            _: ReduceOp,
        ) -> transport::Result<()> {
            fn double<H: HalfFloat>(buf: &mut [u8]) {
                for h in bytemuck::cast_slice_mut::<u8, H>(buf) {
                    *h = H::from_f32(h.to_f32() * 2.0);
                }
            }
            match dtype {
                transport::DType::F32 => {
                    for v in bytemuck::cast_slice_mut::<u8, f32>(buf) {
                        *v *= 2.0;
                    }
                }
                transport::DType::BF16 => double::<Bf16>(buf),
                transport::DType::F16 => double::<F16>(buf),
                other => unreachable!("DDP does not reduce {other:?}"),
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
        fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> transport::Result<()> {
            recv.copy_from_slice(send);
            Ok(())
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

    /// `x` rounded through the wire format as the one-rank Doubling all-reduce leaves it.
    fn doubled_through(compression: GradCompression, x: f32) -> f32 {
        match compression {
            GradCompression::None => x * 2.0,
            GradCompression::Bf16 => Bf16::from_f32(Bf16::from_f32(x).to_f32() * 2.0).to_f32(),
            GradCompression::Fp16 => F16::from_f32(F16::from_f32(x).to_f32() * 2.0).to_f32(),
        }
    }

    #[test]
    fn buckets_launch_during_backward_and_results_land_on_the_right_parameters() {
        for compression in [
            GradCompression::None,
            GradCompression::Bf16,
            GradCompression::Fp16,
        ] {
            let mut model = crate::model::build_model("4,M,8,M", 2).expect("model");
            let comm =
                transport::Communicator::from_backend(Box::new(Doubling), "test").into_async();
            // Tiny sizes: several buckets (the 8x4x3x3 conv weight alone is 1152 bytes).
            let mut ddp = DdpSync::new(comm, &model, 0.0005, 0.001, compression).expect("buffers");
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
                let (_, done) = ddp.finish(model.params_mut(), None);
                done.expect("finish");
                for (p, g) in model.params().iter().zip(&local) {
                    let doubled: Vec<f32> =
                        g.iter().map(|&v| doubled_through(compression, v)).collect();
                    assert_eq!(p.grad, doubled, "{compression:?} {}", p.name);
                }
            }
        }
    }
}
