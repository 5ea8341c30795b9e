//! A minimal reverse-mode autograd: a tape of recorded ops over pooled buffers.
//!
//! # Model
//! - Parameters ([`Param`]) live outside the tape (in the model); ops refer to them by index
//!   into the `&[Param<T>]` slice passed to every call. `backward` writes `Param::grad`
//!   (overwriting the previous step's gradient, summing when a parameter is used twice).
//! - Activations are tape *values*. A [`ValueId`] is a handle: ops **consume** their input
//!   handles (fan-out needs an explicit [`Tape::share`]), so the tape knows when nothing but
//!   backward can still read a buffer. A value's data is returned to the buffer pool as soon as
//!   no handle refers to it and no recorded backward needs it (e.g. the batch-norm output once
//!   relu has read it: relu backward uses its own output, batch-norm backward its input).
//! - [`Tape::backward`] walks the recorded nodes in reverse. Gradients that reach a value from
//!   several consumers are summed; a value's gradient buffer is recycled as soon as the node that
//!   produced the value has consumed it (leaf gradients are kept for [`Tape::grad`]).
//! - `on_grad_ready(param_index, grad)` is called the moment a parameter's gradient is final,
//!   i.e. right after the backward of the first (in forward order) op that used it. Parameters
//!   no recorded op used get no call and keep their old gradient.
//! - Buffers come from a pool keyed by length; [`Tape::reset`] returns everything to it, so a
//!   training loop with a fixed batch size allocates only during its first step.
//!   [`Tape::clear_pool`] gives the memory back (e.g. when the batch size changes).
//!
//! # Ops
//! Each op lives in one file of [`crate::ops`]: its `*_forward` / `*_backward` functions, its
//! recording method on [`Tape`] (e.g. `Tape::relu` in `ops/relu.rs`) and its tape node, a
//! type implementing `TapeNode` whose `backward` back-propagates one recorded use. This file
//! only knows the node trait: adding an op touches its own file (and `ops/mod.rs`).
//!
//! ```
//! use engine::autograd::{Param, Tape};
//! // A 2-layer MLP sharing nothing: x[2,3] -> linear(W1,b1) -> relu -> linear(W2) -> CE.
//! let mut params = vec![
//!     Param::new("w1", &[4, 3], vec![0.1f64; 12]),
//!     Param::new("b1", &[4], vec![0.0; 4]),
//!     Param::new("w2", &[2, 4], vec![0.2, -0.1, 0.3, 0.0, -0.2, 0.1, 0.0, 0.4]),
//! ];
//! let mut tape = Tape::<f64>::new();
//! tape.reset();
//! let x = tape.leaf(&[2, 3], &[1.0, 2.0, 3.0, -1.0, 0.5, 0.0], false);
//! let h = tape.linear(&params, x, 0, Some(1));
//! let h = tape.relu(h);
//! let logits = tape.linear(&params, h, 2, None);
//! let (loss, loss_value) = tape.cross_entropy(logits, &[0, 1]);
//! let mut ready = Vec::new();
//! tape.backward(loss, &mut params, &mut |i, _grad| ready.push(i));
//! assert_eq!(ready, vec![2, 0, 1]); // w2 first; w1 and b1 when the first linear is done
//! assert!(loss_value > 0.0 && params[0].grad.iter().any(|g| *g != 0.0));
//! ```

use std::collections::HashMap;

use crate::tensor::numel;
use crate::Float;

pub use crate::ops::batchnorm::{BnBatchStats, BnMode, BN_EPS};

/// A trainable tensor: PyTorch state-dict name, shape, value and gradient (same length).
#[derive(Clone, Debug)]
pub struct Param<T> {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<T>,
    pub grad: Vec<T>,
}

impl<T: Float> Param<T> {
    /// A parameter with the given value and a zero gradient.
    pub fn new(name: impl Into<String>, shape: &[usize], value: Vec<T>) -> Self {
        assert_eq!(numel(shape), value.len(), "param value/shape mismatch");
        let grad = vec![T::zero(); value.len()];
        Param {
            name: name.into(),
            shape: shape.to_vec(),
            value,
            grad,
        }
    }
    pub fn numel(&self) -> usize {
        self.value.len()
    }
}

/// A handle to a tape value. Not `Clone`: ops consume it; use [`Tape::share`] for fan-out.
#[derive(Debug)]
#[must_use = "a dropped handle keeps its buffer alive until Tape::reset; pass it to an op or Tape::release"]
pub struct ValueId(pub(crate) usize);

struct Slot<T> {
    shape: Vec<usize>,
    data: Option<Vec<T>>,
    grad: Option<Vec<T>>,
    /// Live [`ValueId`] handles.
    handles: usize,
    /// Recorded nodes whose backward still reads `data`.
    saved: usize,
    requires_grad: bool,
    is_leaf: bool,
}

/// One recorded op use: what backward needs to back-propagate it. Implemented by each op's
/// node type in its own file (see the module docs).
///
/// Values are referred to by slot index (`ValueId::0`), parameters by index into the
/// parameter slice.
pub(crate) trait TapeNode<T: Float> {
    /// Op name (profiles).
    fn op(&self) -> &'static str;
    /// The slot this node's forward wrote.
    fn output(&self) -> usize;
    /// Back-propagates the output gradient `dy` (zeros if it did not reach the loss): writes
    /// parameter gradients through [`Tape::write_param_grads`] (which fires the ready hooks)
    /// and input gradients through [`Tape::accumulate`] / [`Tape::deliver_grad`], and calls
    /// [`Tape::unsave`] for every value it saved. It may take `dy` (leaving it empty) to hand
    /// the buffer on; otherwise the tape recycles it.
    fn backward(&self, tape: &mut Tape<T>, grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>);
    /// Returns buffers the node owns to the tape's pools ([`Tape::reset`]).
    fn recycle(self: Box<Self>, _pools: &mut Pools<T>) {}
}

/// Free buffers keyed by length (contents are stale: every user overwrites them).
pub(crate) struct Pool<E> {
    free: HashMap<usize, Vec<Vec<E>>>,
    /// Buffers ever allocated (not served from the free lists).
    fresh: usize,
}

impl<E: Copy + Default> Pool<E> {
    fn new() -> Self {
        Pool {
            free: HashMap::new(),
            fresh: 0,
        }
    }
    pub(crate) fn take(&mut self, len: usize) -> Vec<E> {
        match self.free.get_mut(&len).and_then(|v| v.pop()) {
            Some(buf) => buf,
            None => {
                self.fresh += 1;
                vec![E::default(); len]
            }
        }
    }
    pub(crate) fn give(&mut self, buf: Vec<E>) {
        self.free.entry(buf.len()).or_default().push(buf);
    }
    fn clear(&mut self) {
        self.free.clear();
    }
}

/// The tape's buffer pools: float buffers (values, gradients, saved statistics) and byte
/// buffers (max-pool window positions).
pub(crate) struct Pools<T> {
    pub(crate) floats: Pool<T>,
    pub(crate) bytes: Pool<u8>,
}

/// Parameters being back-propagated into, and the ready hook (see [`Tape::backward`]).
pub(crate) struct ParamGrads<'a, T> {
    pub(crate) params: &'a mut [Param<T>],
    hook: &'a mut dyn FnMut(usize, &[T]),
}

/// Accumulated wall time of one recorded node (see [`Tape::set_profiling`]).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeProfile {
    pub op: &'static str,
    pub out_shape: Vec<usize>,
    pub forward_ms: f64,
    pub backward_ms: f64,
}

/// The tape: recorded nodes, value slots and the buffer pools.
pub struct Tape<T: Float> {
    slots: Vec<Slot<T>>,
    nodes: Vec<Box<dyn TapeNode<T>>>,
    pub(crate) pools: Pools<T>,
    grad_enabled: bool,
    /// Per parameter index: recorded uses not yet back-propagated.
    param_pending: Vec<usize>,
    /// Per parameter index: whether this backward already wrote its gradient.
    param_written: Vec<bool>,
    profiling: bool,
    /// When the previous node was recorded (forward time of a node = time since then).
    profile_mark: Option<std::time::Instant>,
    profile: Vec<NodeProfile>,
}

impl<T: Float> Default for Tape<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Disjoint mutable borrows of two parameters' gradients.
fn two_grads<T>(params: &mut [Param<T>], i: usize, j: usize) -> (&mut [T], &mut [T]) {
    assert_ne!(i, j, "an op cannot use the same parameter twice");
    if i < j {
        let (a, b) = params.split_at_mut(j);
        (&mut a[i].grad, &mut b[0].grad)
    } else {
        let (a, b) = params.split_at_mut(i);
        (&mut b[0].grad, &mut a[j].grad)
    }
}

impl<T: Float> Tape<T> {
    pub fn new() -> Self {
        Tape {
            slots: Vec::new(),
            nodes: Vec::new(),
            pools: Pools {
                floats: Pool::new(),
                bytes: Pool::new(),
            },
            grad_enabled: true,
            param_pending: Vec::new(),
            param_written: Vec::new(),
            profiling: false,
            profile_mark: None,
            profile: Vec::new(),
        }
    }

    /// Starts a new forward pass: forgets all nodes and values and recycles their buffers.
    pub fn reset(&mut self) {
        for slot in self.slots.drain(..) {
            if let Some(d) = slot.data {
                self.pools.floats.give(d);
            }
            if let Some(g) = slot.grad {
                self.pools.floats.give(g);
            }
        }
        for node in self.nodes.drain(..) {
            node.recycle(&mut self.pools);
        }
        self.param_pending.iter_mut().for_each(|c| *c = 0);
        if self.profiling {
            self.profile_mark = Some(std::time::Instant::now());
        }
    }

    /// Per-node timing (accumulated over steps until [`Tape::take_profile`]): a node's forward
    /// time is measured from the previous node's recording (or `reset`), so it includes any
    /// leaf copy in between. For benchmarks; off by default.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        self.profile_mark = on.then(std::time::Instant::now);
    }

    /// The accumulated per-node profile (in recording order), cleared.
    pub fn take_profile(&mut self) -> Vec<NodeProfile> {
        std::mem::take(&mut self.profile)
    }

    /// Records a node (ops call this after their forward when [`Tape::record`] is true).
    pub(crate) fn push_node(&mut self, node: Box<dyn TapeNode<T>>) {
        if self.profiling {
            let now = std::time::Instant::now();
            let i = self.nodes.len();
            if self.profile.len() <= i {
                self.profile.push(NodeProfile {
                    op: node.op(),
                    out_shape: self.slots[node.output()].shape.clone(),
                    forward_ms: 0.0,
                    backward_ms: 0.0,
                });
            }
            if let Some(mark) = self.profile_mark {
                self.profile[i].forward_ms += (now - mark).as_secs_f64() * 1e3;
            }
            self.profile_mark = Some(now);
        }
        self.nodes.push(node);
    }

    /// [`Tape::reset`] and free the pooled memory.
    pub fn clear_pool(&mut self) {
        self.reset();
        self.pools.floats.clear();
        self.pools.bytes.clear();
    }

    /// Number of buffers this tape has allocated so far (not reused from its pool): constant
    /// across steps of a fixed batch size once the first step ran.
    pub fn fresh_allocations(&self) -> usize {
        self.pools.floats.fresh + self.pools.bytes.fresh
    }

    /// When disabled, ops record nothing and keep no buffers for backward (inference).
    pub fn set_grad_enabled(&mut self, enabled: bool) {
        self.grad_enabled = enabled;
    }
    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    fn new_slot(&mut self, shape: Vec<usize>, requires_grad: bool, is_leaf: bool) -> usize {
        let data = self.pools.floats.take(numel(&shape));
        self.slots.push(Slot {
            shape,
            data: Some(data),
            grad: None,
            handles: 1,
            saved: 0,
            requires_grad: requires_grad && self.grad_enabled,
            is_leaf,
        });
        self.slots.len() - 1
    }

    /// A new op output of `shape` whose data `compute(tape, y)` writes (`y` is a pooled buffer
    /// with stale contents); returns its slot.
    pub(crate) fn new_output(
        &mut self,
        shape: Vec<usize>,
        compute: impl FnOnce(&Self, &mut [T]),
    ) -> usize {
        let y = self.new_slot(shape, true, false);
        let mut yd = self.slots[y].data.take().expect("a new slot has data");
        compute(self, &mut yd);
        self.slots[y].data = Some(yd);
        y
    }

    pub(crate) fn maybe_free_data(&mut self, v: usize) {
        let slot = &mut self.slots[v];
        if slot.handles == 0 && slot.saved == 0 {
            if let Some(d) = slot.data.take() {
                self.pools.floats.give(d);
            }
        }
    }

    /// Drops a handle (its buffer is recycled if nothing else needs it).
    pub fn release(&mut self, v: ValueId) {
        self.slots[v.0].handles -= 1;
        self.maybe_free_data(v.0);
    }

    /// A second handle to the same value (fan-out); gradients from both uses are summed.
    pub fn share(&mut self, v: &ValueId) -> ValueId {
        self.slots[v.0].handles += 1;
        ValueId(v.0)
    }

    /// A new leaf value holding a copy of `data`. `requires_grad` leaves keep their gradient
    /// after backward ([`Tape::grad`]).
    pub fn leaf(&mut self, shape: &[usize], data: &[T], requires_grad: bool) -> ValueId {
        assert_eq!(numel(shape), data.len(), "leaf data/shape mismatch");
        let v = self.new_slot(shape.to_vec(), requires_grad, true);
        self.slots[v].data.as_mut().unwrap().copy_from_slice(data);
        ValueId(v)
    }

    pub fn shape(&self, v: &ValueId) -> &[usize] {
        &self.slots[v.0].shape
    }

    /// The value's data (alive as long as a handle is).
    pub fn data(&self, v: &ValueId) -> &[T] {
        self.value(v.0)
    }

    /// The data of slot `v` (ops read their inputs and saved values this way).
    pub(crate) fn value(&self, v: usize) -> &[T] {
        self.slots[v]
            .data
            .as_deref()
            .expect("a value with a live handle or a saving node keeps its data")
    }

    /// Whether backward must produce a gradient for slot `v`.
    pub(crate) fn requires_grad(&self, v: usize) -> bool {
        self.slots[v].requires_grad
    }

    /// Whether slot `v` has received a gradient yet in this backward.
    pub(crate) fn has_grad(&self, v: usize) -> bool {
        self.slots[v].grad.is_some()
    }

    /// The gradient of a leaf after backward (`None` if no gradient reached it).
    pub fn grad(&self, v: &ValueId) -> Option<&[T]> {
        self.slots[v.0].grad.as_deref()
    }

    /// Consumes input handle `x`; records that backward reads its data if `save`. Returns the
    /// slot; the op calls [`Tape::maybe_free_data`] on it once its forward is done with it.
    pub(crate) fn consume_input(&mut self, x: ValueId, save: bool) -> usize {
        let v = x.0;
        self.slots[v].handles -= 1;
        if save {
            self.slots[v].saved += 1;
        }
        v
    }

    /// Records that a node's backward reads the data of slot `v` (e.g. relu its output).
    pub(crate) fn save(&mut self, v: usize) {
        self.slots[v].saved += 1;
    }

    /// Records that a node uses parameter `p` (its gradient is final once every use is
    /// back-propagated).
    pub(crate) fn note_param_use(&mut self, p: usize) {
        if self.param_pending.len() <= p {
            self.param_pending.resize(p + 1, 0);
            self.param_written.resize(p + 1, false);
        }
        self.param_pending[p] += 1;
    }

    /// Whether ops record nodes now (gradients enabled).
    pub(crate) fn record(&self) -> bool {
        self.grad_enabled
    }

    /// Adds a freshly computed gradient for value `v`: the first contribution is written in
    /// place, later ones (fan-out) are computed into a scratch buffer and summed.
    pub(crate) fn accumulate(&mut self, v: usize, compute: impl FnOnce(&Self, &mut [T])) {
        let len = numel(&self.slots[v].shape);
        match self.slots[v].grad.take() {
            None => {
                let mut g = self.pools.floats.take(len);
                compute(self, &mut g);
                self.slots[v].grad = Some(g);
            }
            Some(mut g) => {
                let mut tmp = self.pools.floats.take(len);
                compute(self, &mut tmp);
                crate::ops::add_assign(&mut g, &tmp);
                self.pools.floats.give(tmp);
                self.slots[v].grad = Some(g);
            }
        }
    }

    /// Hands a computed gradient buffer to value `v`: it becomes `v`'s gradient (no copy) or,
    /// on fan-out, is summed into the existing one and recycled.
    pub(crate) fn deliver_grad(&mut self, v: usize, buf: Vec<T>) {
        match self.slots[v].grad.take() {
            None => self.slots[v].grad = Some(buf),
            Some(mut g) => {
                crate::ops::add_assign(&mut g, &buf);
                self.pools.floats.give(buf);
                self.slots[v].grad = Some(g);
            }
        }
    }

    /// Writes one op's gradients for parameter `p1` (and `p2`) — directly into `Param::grad`
    /// when this backward has not written them yet, else into scratch that is then summed
    /// (a parameter used by several ops) — and then marks this use of each back-propagated,
    /// calling the ready hook for a parameter whose last pending use this was.
    pub(crate) fn write_param_grads(
        &mut self,
        grads: &mut ParamGrads<'_, T>,
        p1: usize,
        p2: Option<usize>,
        compute: impl FnOnce(&Self, &mut [T], Option<&mut [T]>),
    ) {
        let params = &mut *grads.params;
        let fresh = !self.param_written[p1] && p2.is_none_or(|p| !self.param_written[p]);
        if fresh {
            match p2 {
                Some(p2) => {
                    let (g1, g2) = two_grads(params, p1, p2);
                    compute(self, g1, Some(g2));
                }
                None => compute(self, &mut params[p1].grad, None),
            }
        } else {
            let mut t1 = self.pools.floats.take(params[p1].numel());
            let mut t2 = p2.map(|p| self.pools.floats.take(params[p].numel()));
            compute(self, &mut t1, t2.as_deref_mut());
            let mut merge = |tape: &mut Self, p: usize, t: Vec<T>| {
                let g = &mut params[p].grad;
                if tape.param_written[p] {
                    crate::ops::add_assign(g, &t);
                } else {
                    g.copy_from_slice(&t);
                }
                tape.pools.floats.give(t);
            };
            merge(self, p1, t1);
            if let (Some(p2), Some(t2)) = (p2, t2) {
                merge(self, p2, t2);
            }
        }
        self.param_written[p1] = true;
        if let Some(p2) = p2 {
            self.param_written[p2] = true;
        }
        self.param_done(grads, p1);
        if let Some(p2) = p2 {
            self.param_done(grads, p2);
        }
    }

    fn param_done(&mut self, grads: &mut ParamGrads<'_, T>, p: usize) {
        self.param_pending[p] -= 1;
        if self.param_pending[p] == 0 {
            (grads.hook)(p, &grads.params[p].grad);
        }
    }

    /// For a node whose backward is the last reader of slot `v` (no handle left, no other
    /// saving node): takes `v`'s data buffer — e.g. to write `v`'s gradient over it — and
    /// counts as the node's [`Tape::unsave`]. `None` (nothing changed) otherwise.
    pub(crate) fn take_saved_data(&mut self, v: usize) -> Option<Vec<T>> {
        let slot = &mut self.slots[v];
        if slot.handles == 0 && slot.saved == 1 {
            slot.saved = 0;
            slot.data.take()
        } else {
            None
        }
    }

    /// A node's backward no longer needs slot `v`'s data.
    pub(crate) fn unsave(&mut self, v: usize) {
        self.slots[v].saved -= 1;
        self.maybe_free_data(v);
    }

    /// Back-propagates from the scalar `loss` (seed gradient 1) through every recorded node,
    /// writing parameter gradients and calling `on_grad_ready` as each becomes final.
    pub fn backward(
        &mut self,
        loss: ValueId,
        params: &mut [Param<T>],
        on_grad_ready: &mut dyn FnMut(usize, &[T]),
    ) {
        assert!(
            self.slots[loss.0].shape.is_empty(),
            "backward needs a scalar loss"
        );
        let mut seed = self.pools.floats.take(1);
        seed[0] = T::one();
        if let Some(old) = self.slots[loss.0].grad.replace(seed) {
            self.pools.floats.give(old);
        }
        self.release(loss);
        self.param_written.iter_mut().for_each(|w| *w = false);
        let mut grads = ParamGrads {
            params,
            hook: on_grad_ready,
        };
        let nodes = std::mem::take(&mut self.nodes);
        let mut done_nodes = Vec::with_capacity(nodes.len());
        let n_nodes = nodes.len();
        for (rev_i, node) in nodes.into_iter().rev().enumerate() {
            let node_start = self.profiling.then(std::time::Instant::now);
            // The output's gradient (zeros if it did not reach the loss).
            let out = node.output();
            let mut dy = match self.slots[out].grad.take() {
                Some(g) => g,
                None => {
                    let mut g = self.pools.floats.take(numel(&self.slots[out].shape));
                    g.iter_mut().for_each(|v| *v = T::zero());
                    g
                }
            };
            node.backward(self, &mut grads, &mut dy);
            // The output's gradient is consumed; leaf outputs do not exist here.
            if !dy.is_empty() {
                self.pools.floats.give(dy);
            }
            if let Some(t0) = node_start {
                if let Some(p) = self.profile.get_mut(n_nodes - 1 - rev_i) {
                    p.backward_ms += t0.elapsed().as_secs_f64() * 1e3;
                }
            }
            done_nodes.push(node);
        }
        // Keep the nodes' saved buffers for recycling by `reset` (in recording order).
        done_nodes.reverse();
        self.nodes = done_nodes;
        // Non-leaf gradients that never reached a producer (none in a connected graph) go back.
        for i in 0..self.slots.len() {
            if !self.slots[i].is_leaf {
                if let Some(g) = self.slots[i].grad.take() {
                    self.pools.floats.give(g);
                }
            }
        }
    }
}
