//! VGG networks exactly as the original `model.py`: a data-driven `layers` Sequential of
//! `Conv2d(k=3, s=1, p=1, bias) → BatchNorm2d → ReLU` per number and `MaxPool2d(2, 2)` per `M`,
//! then flatten → `Linear(fc_in, classes)` named `fc1`.
//!
//! # Using it
//! ```
//! use engine::{load_tensors, save_tensors, Sgd, Vgg, VggConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Full size: Vgg::<f32>::new(VggConfig::vgg11(), seed). A tiny one here:
//! let config = VggConfig::from_spec("8,M,16,M", 3, 8, 10)?; // fc1 input 16·2·2
//! let mut model = Vgg::<f32>::new(config, /* seed */ 0); // PyTorch default init
//! let mut sgd = Sgd::new(0.1, 0.9, 5e-4);
//! let n = 2;
//! let x = vec![0.5f32; n * 3 * 8 * 8]; // [n, 3, H, W] flat
//! let labels = [3u32, 7];
//! model.set_training(true);
//! let stats = model.forward_backward(&x, n, &labels, &mut |param_index, grad| {
//!     // model.params()[param_index].grad == grad is final: e.g. start its all-reduce here
//!     assert!(!grad.is_empty() && param_index < 10);
//! })?;
//! assert!(stats.loss > 0.0 && stats.correct <= n);
//! for p in model.params_mut() {
//!     // write averaged gradients back into p.grad (p.name, p.shape, p.value also here)
//!     p.grad.iter_mut().for_each(|g| *g *= 1.0);
//! }
//! sgd.step(model.params_mut());
//! let logits = model.forward_eval(&x, n)?; // running statistics, nothing recorded
//! assert_eq!(logits.len(), n * 10);
//! let (loss_sum, correct) = model.evaluate(&x, n, &labels)?;
//! # let _ = (loss_sum, correct);
//! // Checkpoint: model state (PyTorch names) + momentum + anything else the caller adds.
//! let mut tensors = model.state_dict();
//! tensors.extend(sgd.state_tensors(model.params()));
//! let path = std::env::temp_dir().join(format!("vgg-doc-{}.safetensors", std::process::id()));
//! save_tensors(&path, &tensors, &Default::default())?;
//! let loaded = load_tensors(&path)?;
//! model.load_state_dict(&loaded.tensors, /* strict */ false)?; // strict rejects optimizer.*
//! sgd.load_state_tensors(model.params(), &loaded.tensors)?;
//! # std::fs::remove_file(&path)?;
//! # Ok(())
//! # }
//! ```
//!
//! Parameter order (= hook index) is PyTorch's `parameters()` order: per conv block
//! `layers.{i}.weight`, `layers.{i}.bias` (conv), `layers.{i+1}.weight`, `layers.{i+1}.bias`
//! (batch norm); then `fc1.weight`, `fc1.bias`. Batch-norm buffers (`running_mean`,
//! `running_var`, `num_batches_tracked`) are reached through [`Vgg::bn_buffers`] /
//! [`Vgg::bn_buffers_mut`] (e.g. for a DDP broadcast).

use std::collections::BTreeMap;

use thiserror::Error;

use crate::autograd::{BnBatchStats, BnMode, Param, Tape, ValueId};
use crate::init::{init_rng, init_weight_and_bias};
use crate::parallel;
use crate::state::{NamedTensor, StateError};
use crate::tensor::numel;
use crate::Float;

/// Batch-norm momentum (PyTorch default).
pub const BN_MOMENTUM: f64 = 0.1;

pub const VGG11: &str = "64,M,128,M,256,256,M,512,512,M,512,512,M";
pub const VGG13: &str = "64,64,M,128,128,M,256,256,M,512,512,M,512,512,M";
pub const VGG16: &str = "64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M";
pub const VGG19: &str = "64,64,M,128,128,M,256,256,256,256,M,512,512,512,512,M,512,512,512,512,M";

/// One entry of a VGG config list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerSpec {
    /// Conv2d(3×3, pad 1) → BatchNorm2d → ReLU with this many output channels.
    Conv(usize),
    /// MaxPool2d(2, 2).
    MaxPool,
}

/// Errors building or running a model on caller data.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("bad layer spec {spec:?}: {reason}")]
    BadSpec { spec: String, reason: String },
    #[error("input has {found} values, expected {expected} for batch {n} of {c}x{h}x{w}")]
    BadInput {
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        expected: usize,
        found: usize,
    },
    #[error("{found} labels for a batch of {n}")]
    BadLabelCount { n: usize, found: usize },
    #[error("label {label} at batch index {index} is not below the class count {classes}")]
    BadLabel {
        index: usize,
        label: u32,
        classes: usize,
    },
    #[error("empty batch")]
    EmptyBatch,
    #[error(
        "batch of {n} is too small for training: batch norm at {h}x{w} needs more than one \
         value per channel (as PyTorch)"
    )]
    BatchTooSmallForBatchNorm { n: usize, h: usize, w: usize },
    #[error("forward_backward needs training mode (eval-mode batch norm is not differentiated)")]
    NotTraining,
}

/// Parses a spec like `"64,M,128,M"` (numbers = conv widths, `M` = max-pool; spaces allowed)
/// or the name `vgg11` (any case), which stands for [`VGG11`]. The one parser of model specs.
pub fn parse_spec(spec: &str) -> Result<Vec<LayerSpec>, ModelError> {
    let bad = |reason: String| ModelError::BadSpec {
        spec: spec.to_string(),
        reason,
    };
    let layers = if spec.trim().eq_ignore_ascii_case("vgg11") {
        VGG11
    } else {
        spec
    };
    let mut out = Vec::new();
    for item in layers.split(',') {
        let item = item.trim();
        if item.eq_ignore_ascii_case("m") {
            out.push(LayerSpec::MaxPool);
        } else {
            match item.parse::<usize>() {
                Ok(0) => return Err(bad("a conv width must be positive".into())),
                Ok(w) => out.push(LayerSpec::Conv(w)),
                Err(_) => return Err(bad(format!("{item:?} is neither a width nor M"))),
            }
        }
    }
    if !out.iter().any(|l| matches!(l, LayerSpec::Conv(_))) {
        return Err(bad("needs at least one conv layer".into()));
    }
    Ok(out)
}

/// Architecture: layer list, input geometry, class count; and the arithmetic of its
/// multiply-adds (`precision`, not part of the architecture: a checkpoint trained in one
/// precision loads into a model of the other).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VggConfig {
    pub layers: Vec<LayerSpec>,
    pub in_channels: usize,
    pub image_size: usize,
    pub num_classes: usize,
    /// `--precision`: f32, or bf16 operands with f32 accumulation in the conv (im2col) and
    /// classifier GEMMs; weights, gradients, SGD, batch norm and the loss are f32 either way.
    /// Set with [`VggConfig::with_precision`]; f64 models ignore it.
    pub precision: crate::gemm::Precision,
}

impl VggConfig {
    /// VGG11 for 3×32×32 CIFAR-10 images (the original `model.py`).
    pub fn vgg11() -> Self {
        Self::from_spec(VGG11, 3, 32, 10).expect("VGG11 spec is valid")
    }

    /// A config from a spec string; checks that every pool sees an even spatial size.
    pub fn from_spec(
        spec: &str,
        in_channels: usize,
        image_size: usize,
        num_classes: usize,
    ) -> Result<Self, ModelError> {
        let layers = parse_spec(spec)?;
        let mut hw = image_size;
        for l in &layers {
            if *l == LayerSpec::MaxPool {
                if hw < 2 {
                    return Err(ModelError::BadSpec {
                        spec: spec.to_string(),
                        reason: format!("too many pools for a {image_size}x{image_size} input"),
                    });
                }
                hw /= 2;
            }
        }
        if in_channels == 0 || num_classes == 0 {
            return Err(ModelError::BadSpec {
                spec: spec.to_string(),
                reason: "in_channels and num_classes must be positive".into(),
            });
        }
        Ok(VggConfig {
            layers,
            in_channels,
            image_size,
            num_classes,
            precision: crate::gemm::Precision::F32,
        })
    }

    /// The same architecture computed in `precision`.
    pub fn with_precision(self, precision: crate::gemm::Precision) -> Self {
        VggConfig { precision, ..self }
    }

    /// Flattened feature size entering `fc1` (512 for VGG11 on 32×32).
    pub fn fc_in(&self) -> usize {
        let mut c = self.in_channels;
        let mut hw = self.image_size;
        for l in &self.layers {
            match l {
                LayerSpec::Conv(w) => c = *w,
                LayerSpec::MaxPool => hw /= 2,
            }
        }
        c * hw * hw
    }

    /// Each conv layer's name (`layers.{i}`, as in the state dict) and geometry for a batch
    /// of `n` images: 3x3, stride 1, padding 1, as [`Vgg::forward_backward`] runs them. The
    /// conv plan printed by `dtrain --verbose` and the benches comes from these.
    pub fn conv_geoms(&self, n: usize) -> Vec<(String, crate::ops::Conv2dGeom)> {
        let (mut c, mut hw, mut seq) = (self.in_channels, self.image_size, 0);
        let mut out = Vec::new();
        for l in &self.layers {
            match *l {
                LayerSpec::Conv(c_out) => {
                    let g = crate::ops::Conv2dGeom::new(n, c, hw, hw, c_out, (3, 3), 1, 1);
                    out.push((format!("layers.{seq}"), g));
                    c = c_out;
                    seq += 3;
                }
                LayerSpec::MaxPool => {
                    hw /= 2;
                    seq += 1;
                }
            }
        }
        out
    }

    /// One line per conv layer naming the algorithm each pass runs in this process (SIMD
    /// level and `--conv-algo` applied), e.g. `layers.4   64->128  16x16: fwd winograd-f4,
    /// bwd-data winograd-f4, bwd-weight winograd-f4`.
    ///
    /// In bf16 the lines are preceded by one naming the bf16 GEMM kernel (native or emulated),
    /// each pass says whether it runs in bf16 or in f32 (no bf16 kernel for direct and
    /// Winograd), and a last line covers the classifier.
    pub fn conv_plan_lines(&self, n: usize) -> Vec<String> {
        use crate::gemm::Precision;
        let mut lines = Vec::new();
        if self.precision == Precision::Bf16 {
            lines.push(format!(
                "precision bf16: GEMM kernel {}; weights, gradients, SGD, batch norm, loss in f32",
                crate::gemm::Bf16Kernel::detect().name()
            ));
        }
        crate::gemm::with_precision(self.precision, || {
            for (name, g) in self.conv_geoms(n) {
                let shape = format!("{}->{}", g.c_in, g.c_out);
                let size = format!("{}x{}", g.h, g.w);
                let plan = crate::ops::conv2d_plan(&g);
                lines.push(format!("{name:<10} {shape:>8} {size:>5}: {plan}"));
            }
        });
        if self.precision == Precision::Bf16 {
            let fc = format!("{}->{}", self.fc_in(), self.num_classes);
            lines.push(format!(
                "{:<10} {fc:>8} {:>5}: fwd, bwd-data, bwd-weight GEMM [bf16]",
                "fc1", ""
            ));
        }
        lines
    }
}

/// Batch-norm buffers of one layer (`layers.{index}.*`).
#[derive(Clone, Debug)]
pub struct BnBuffers<T> {
    /// State-dict prefix, e.g. `layers.1`.
    pub prefix: String,
    pub running_mean: Vec<T>,
    pub running_var: Vec<T>,
    pub num_batches_tracked: i64,
    /// The last training batch's statistics (for [`BnBuffers::rebase_running`]).
    pub last_batch: BnBatchStats<T>,
}

impl<T: Float> BnBuffers<T> {
    /// The running statistics as if they had been `mean`/`var` before the last training
    /// forward: `(1-m)·base + m·batch`, the same bits as setting them first and then running
    /// the forward.
    pub fn rebase_running(&mut self, mean: &[T], var: &[T]) {
        self.last_batch.update_running(
            BN_MOMENTUM,
            mean,
            var,
            &mut self.running_mean,
            &mut self.running_var,
        );
    }
}

#[derive(Clone, Copy, Debug)]
enum Layer {
    ConvBnRelu {
        conv_w: usize,
        conv_b: usize,
        bn_gamma: usize,
        bn_beta: usize,
        bn: usize,
    },
    MaxPool,
}

/// Loss and accuracy of one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Number of samples whose arg-max logit is the label.
    pub correct: usize,
}

/// A VGG network with its parameters, batch-norm buffers and tapes.
pub struct Vgg<T: Float> {
    config: VggConfig,
    layers: Vec<Layer>,
    params: Vec<Param<T>>,
    bn: Vec<BnBuffers<T>>,
    fc_w: usize,
    fc_b: usize,
    training: bool,
    train_tape: Tape<T>,
    train_batch: usize,
    eval_tape: Tape<T>,
    eval_batch: usize,
    /// Logits of the last `forward_backward` (train mode), `[n, classes]`.
    last_logits: Vec<T>,
    /// Threads for this model's ops (`None`: the surrounding [`parallel::num_threads`]).
    threads: Option<usize>,
    /// ε of the training loss (PyTorch's `CrossEntropyLoss(label_smoothing=ε)`); evaluation
    /// reports the plain cross-entropy.
    label_smoothing: f64,
}

/// Index of the max logit (first wins on ties, as `argmax`).
fn argmax<T: Float>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

impl<T: Float> Vgg<T> {
    /// Builds the network with PyTorch's default init drawn from a ChaCha RNG seeded with
    /// `seed` (conv weight then bias, layer by layer, then `fc1`).
    pub fn new(config: VggConfig, seed: u64) -> Self {
        let mut rng = init_rng(seed);
        let mut params = Vec::new();
        let mut bn = Vec::new();
        let mut layers = Vec::new();
        let mut c_in = config.in_channels;
        let mut seq = 0; // Sequential index
        for l in &config.layers {
            match *l {
                LayerSpec::Conv(c_out) => {
                    let w_shape = [c_out, c_in, 3, 3];
                    let mut w = vec![T::zero(); numel(&w_shape)];
                    let mut b = vec![T::zero(); c_out];
                    init_weight_and_bias(&mut rng, &w_shape, &mut w, Some(&mut b));
                    let conv_w = params.len();
                    params.push(Param::new(format!("layers.{seq}.weight"), &w_shape, w));
                    params.push(Param::new(format!("layers.{seq}.bias"), &[c_out], b));
                    let bn_gamma = params.len();
                    params.push(Param::new(
                        format!("layers.{}.weight", seq + 1),
                        &[c_out],
                        vec![T::one(); c_out],
                    ));
                    params.push(Param::new(
                        format!("layers.{}.bias", seq + 1),
                        &[c_out],
                        vec![T::zero(); c_out],
                    ));
                    bn.push(BnBuffers {
                        prefix: format!("layers.{}", seq + 1),
                        running_mean: vec![T::zero(); c_out],
                        running_var: vec![T::one(); c_out],
                        num_batches_tracked: 0,
                        last_batch: BnBatchStats::default(),
                    });
                    layers.push(Layer::ConvBnRelu {
                        conv_w,
                        conv_b: conv_w + 1,
                        bn_gamma,
                        bn_beta: bn_gamma + 1,
                        bn: bn.len() - 1,
                    });
                    c_in = c_out;
                    seq += 3;
                }
                LayerSpec::MaxPool => {
                    layers.push(Layer::MaxPool);
                    seq += 1;
                }
            }
        }
        let fc_shape = [config.num_classes, config.fc_in()];
        let mut w = vec![T::zero(); numel(&fc_shape)];
        let mut b = vec![T::zero(); config.num_classes];
        init_weight_and_bias(&mut rng, &fc_shape, &mut w, Some(&mut b));
        let fc_w = params.len();
        params.push(Param::new("fc1.weight", &fc_shape, w));
        params.push(Param::new("fc1.bias", &[config.num_classes], b));
        Vgg {
            config,
            layers,
            params,
            bn,
            fc_w,
            fc_b: fc_w + 1,
            training: true,
            train_tape: Tape::new(),
            train_batch: 0,
            eval_tape: Tape::new(),
            eval_batch: 0,
            last_logits: Vec::new(),
            threads: None,
            label_smoothing: 0.0,
        }
    }

    /// Train with label smoothing ε (clamped to [0, 1]; 0 is plain cross-entropy).
    pub fn set_label_smoothing(&mut self, eps: f64) {
        self.label_smoothing = eps.clamp(0.0, 1.0);
    }

    /// Runs this model's forward and backward passes on `threads` threads (`None`: whatever
    /// [`parallel::num_threads`] says at the call, e.g. the process default).
    pub fn set_num_threads(&mut self, threads: Option<usize>) {
        self.threads = threads.map(|t| t.max(1));
    }
    pub fn num_threads(&self) -> Option<usize> {
        self.threads
    }

    /// Compute in `precision` from the next step on ([`VggConfig::precision`]); the weights
    /// are f32 either way, so a model can change precision between steps (e.g. on resume).
    pub fn set_precision(&mut self, precision: crate::gemm::Precision) {
        self.config.precision = precision;
    }

    pub fn config(&self) -> &VggConfig {
        &self.config
    }
    /// Training mode: batch statistics + running-stat updates (PyTorch `model.train()`).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }
    pub fn is_training(&self) -> bool {
        self.training
    }
    /// Trainable parameters in PyTorch's `parameters()` order.
    pub fn params(&self) -> &[Param<T>] {
        &self.params
    }
    /// Mutable parameters (write averaged gradients back, optimizer steps, broadcasts).
    pub fn params_mut(&mut self) -> &mut [Param<T>] {
        &mut self.params
    }
    /// Total number of trainable scalars (9,231,114 for VGG11).
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.numel()).sum()
    }
    /// Batch-norm buffers, one entry per conv block.
    pub fn bn_buffers(&self) -> &[BnBuffers<T>] {
        &self.bn
    }
    pub fn bn_buffers_mut(&mut self) -> &mut [BnBuffers<T>] {
        &mut self.bn
    }

    fn check_batch(&self, x: &[T], n: usize, labels: Option<&[u32]>) -> Result<(), ModelError> {
        if n == 0 {
            return Err(ModelError::EmptyBatch);
        }
        let (c, hw) = (self.config.in_channels, self.config.image_size);
        let expected = n * c * hw * hw;
        if x.len() != expected {
            return Err(ModelError::BadInput {
                n,
                c,
                h: hw,
                w: hw,
                expected,
                found: x.len(),
            });
        }
        if let Some(labels) = labels {
            if labels.len() != n {
                return Err(ModelError::BadLabelCount {
                    n,
                    found: labels.len(),
                });
            }
            let classes = self.config.num_classes;
            if let Some((index, &label)) = labels
                .iter()
                .enumerate()
                .find(|(_, &l)| l as usize >= classes)
            {
                return Err(ModelError::BadLabel {
                    index,
                    label,
                    classes,
                });
            }
        }
        Ok(())
    }

    /// Runs the layers on `tape` (recording iff its gradients are enabled) and returns the
    /// logits handle. `train` selects batch statistics (and running-stat updates).
    fn forward_on_tape(
        tape: &mut Tape<T>,
        layers: &[Layer],
        params: &[Param<T>],
        bn: &mut [BnBuffers<T>],
        fc: (usize, usize),
        input: ValueId,
        train: bool,
    ) -> ValueId {
        let mut h = input;
        let mut i = 0;
        while i < layers.len() {
            h = match layers[i] {
                Layer::ConvBnRelu {
                    conv_w,
                    conv_b,
                    bn_gamma,
                    bn_beta,
                    bn: bi,
                } => {
                    let y = tape.conv2d(params, h, conv_w, Some(conv_b), 1, 1);
                    let buffers = &mut bn[bi];
                    let mode = if train {
                        buffers.num_batches_tracked += 1;
                        BnMode::Train {
                            running_mean: &mut buffers.running_mean,
                            running_var: &mut buffers.running_var,
                            momentum: BN_MOMENTUM,
                            last_batch: Some(&mut buffers.last_batch),
                        }
                    } else {
                        BnMode::Eval {
                            running_mean: &buffers.running_mean,
                            running_var: &buffers.running_var,
                        }
                    };
                    // A following 2x2 pool on even planes is fused in (one pass, no
                    // full-size relu output).
                    let s = tape.shape(&y);
                    let pool_next = matches!(layers.get(i + 1), Some(Layer::MaxPool));
                    if pool_next && s[2].is_multiple_of(2) && s[3].is_multiple_of(2) {
                        i += 1;
                        tape.batchnorm2d_relu_maxpool2d(params, y, bn_gamma, bn_beta, mode)
                    } else {
                        tape.batchnorm2d_relu(params, y, bn_gamma, bn_beta, mode)
                    }
                }
                Layer::MaxPool => tape.maxpool2d(h, 2, 2),
            };
            i += 1;
        }
        tape.linear(params, h, fc.0, Some(fc.1))
    }

    /// One training forward + backward on a batch (`x`: `[n, C, H, W]` flat, `labels`: `n`
    /// class indices). Parameter gradients are overwritten; `on_grad_ready(i, grad)` fires as
    /// soon as parameter `i`'s gradient is final (reverse layer order). Updates the batch-norm
    /// running statistics. Buffers are reused across calls with the same batch size.
    pub fn forward_backward(
        &mut self,
        x: &[T],
        n: usize,
        labels: &[u32],
        on_grad_ready: &mut dyn FnMut(usize, &[T]),
    ) -> Result<StepStats, ModelError> {
        self.forward_backward_inner(x, n, labels, false, on_grad_ready)
            .map(|(s, _)| s)
    }

    /// [`Vgg::forward_backward`] that also returns `∂loss/∂x` (for gradient checks).
    pub fn forward_backward_with_input_grad(
        &mut self,
        x: &[T],
        n: usize,
        labels: &[u32],
        on_grad_ready: &mut dyn FnMut(usize, &[T]),
    ) -> Result<(StepStats, Vec<T>), ModelError> {
        self.forward_backward_inner(x, n, labels, true, on_grad_ready)
            .map(|(s, g)| (s, g.unwrap_or_default()))
    }

    fn forward_backward_inner(
        &mut self,
        x: &[T],
        n: usize,
        labels: &[u32],
        want_input_grad: bool,
        on_grad_ready: &mut dyn FnMut(usize, &[T]),
    ) -> Result<(StepStats, Option<Vec<T>>), ModelError> {
        let precision = self.config.precision;
        parallel::with_num_threads_or_default(self.threads, || {
            crate::gemm::with_precision(precision, || {
                self.train_step_on_tape(x, n, labels, want_input_grad, on_grad_ready)
            })
        })
    }

    fn train_step_on_tape(
        &mut self,
        x: &[T],
        n: usize,
        labels: &[u32],
        want_input_grad: bool,
        on_grad_ready: &mut dyn FnMut(usize, &[T]),
    ) -> Result<(StepStats, Option<Vec<T>>), ModelError> {
        if !self.training {
            return Err(ModelError::NotTraining);
        }
        self.check_batch(x, n, Some(labels))?;
        // Smallest spatial size any batch norm sees: the size at the last conv.
        let mut hw = self.config.image_size;
        let mut bn_hw = hw;
        for l in &self.config.layers {
            match l {
                LayerSpec::Conv(_) => bn_hw = hw,
                LayerSpec::MaxPool => hw /= 2,
            }
        }
        if n * bn_hw * bn_hw < 2 {
            return Err(ModelError::BatchTooSmallForBatchNorm {
                n,
                h: bn_hw,
                w: bn_hw,
            });
        }
        let tape = &mut self.train_tape;
        if self.train_batch != n {
            // A new batch size: drop the buffers sized for the old one.
            tape.clear_pool();
            self.train_batch = n;
        }
        tape.reset();
        tape.set_grad_enabled(true);
        let hw = self.config.image_size;
        let input = tape.leaf(&[n, self.config.in_channels, hw, hw], x, want_input_grad);
        let input_handle = if want_input_grad {
            Some(tape.share(&input))
        } else {
            None
        };
        let logits = Self::forward_on_tape(
            tape,
            &self.layers,
            &self.params,
            &mut self.bn,
            (self.fc_w, self.fc_b),
            input,
            true,
        );
        let classes = self.config.num_classes;
        let correct = tape
            .data(&logits)
            .chunks(classes)
            .zip(labels)
            .filter(|(row, &l)| argmax(row) == l as usize)
            .count();
        self.last_logits.clear();
        self.last_logits.extend_from_slice(tape.data(&logits));
        let (loss, loss_value) = tape.cross_entropy_smoothed(logits, labels, self.label_smoothing);
        tape.backward(loss, &mut self.params, on_grad_ready);
        let input_grad = input_handle.map(|h| {
            let g = tape.grad(&h).map(|g| g.to_vec()).unwrap_or_default();
            tape.release(h);
            g
        });
        Ok((
            StepStats {
                loss: loss_value.to_f64_lossy(),
                correct,
            },
            input_grad,
        ))
    }

    /// The training-mode logits (`[n, classes]` flat) of the last `forward_backward`.
    pub fn last_logits(&self) -> &[T] {
        &self.last_logits
    }

    /// Inference forward with the running statistics (PyTorch `eval()` semantics, whatever
    /// the training flag): returns the logits `[n, classes]` flat. Nothing is recorded.
    pub fn forward_eval(&mut self, x: &[T], n: usize) -> Result<Vec<T>, ModelError> {
        let precision = self.config.precision;
        parallel::with_num_threads_or_default(self.threads, || {
            crate::gemm::with_precision(precision, || self.eval_on_tape(x, n))
        })
    }

    fn eval_on_tape(&mut self, x: &[T], n: usize) -> Result<Vec<T>, ModelError> {
        self.check_batch(x, n, None)?;
        let tape = &mut self.eval_tape;
        if self.eval_batch != n {
            tape.clear_pool();
            self.eval_batch = n;
        }
        tape.reset();
        tape.set_grad_enabled(false);
        let hw = self.config.image_size;
        let input = tape.leaf(&[n, self.config.in_channels, hw, hw], x, false);
        let logits = Self::forward_on_tape(
            tape,
            &self.layers,
            &self.params,
            &mut self.bn,
            (self.fc_w, self.fc_b),
            input,
            false,
        );
        let out = tape.data(&logits).to_vec();
        tape.release(logits);
        Ok(out)
    }

    /// Eval-mode loss and accuracy of a batch: (sum of per-sample cross-entropy, number
    /// correct). Sums (not means) so callers can aggregate over batches and ranks.
    pub fn evaluate(
        &mut self,
        x: &[T],
        n: usize,
        labels: &[u32],
    ) -> Result<(f64, usize), ModelError> {
        self.check_batch(x, n, Some(labels))?;
        let logits = self.forward_eval(x, n)?;
        let classes = self.config.num_classes;
        let mut loss_sum = 0.0;
        let mut correct = 0;
        for (row, &label) in logits.chunks(classes).zip(labels) {
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64_lossy()));
            let lse = max
                + row
                    .iter()
                    .map(|v| (v.to_f64_lossy() - max).exp())
                    .sum::<f64>()
                    .ln();
            loss_sum += lse - row[label as usize].to_f64_lossy();
            if argmax(row) == label as usize {
                correct += 1;
            }
        }
        Ok((loss_sum, correct))
    }

    /// Per-node timing of the training tape (benchmarks); see [`Tape::set_profiling`].
    pub fn set_profiling(&mut self, on: bool) {
        self.train_tape.set_profiling(on);
    }
    pub fn take_profile(&mut self) -> Vec<crate::autograd::NodeProfile> {
        self.train_tape.take_profile()
    }

    /// Buffers the training tape has allocated so far (see [`Tape::fresh_allocations`]).
    pub fn train_buffer_allocations(&self) -> usize {
        self.train_tape.fresh_allocations()
    }

    /// Frees the cached activation/gradient buffers (they are re-allocated on the next step).
    pub fn release_buffers(&mut self) {
        self.train_tape.clear_pool();
        self.eval_tape.clear_pool();
        self.train_batch = 0;
        self.eval_batch = 0;
    }

    /// PyTorch `state_dict()`: per conv block `layers.{i}.weight/bias`, then
    /// `layers.{i+1}.weight/bias/running_mean/running_var/num_batches_tracked` (I64, shape
    /// `[]`), then `fc1.weight/bias`. Floats are stored in `T`'s precision.
    pub fn state_dict(&self) -> Vec<NamedTensor> {
        let mut out = Vec::with_capacity(self.params.len() + 3 * self.bn.len());
        for layer in &self.layers {
            if let Layer::ConvBnRelu {
                conv_w,
                conv_b,
                bn_gamma,
                bn_beta,
                bn,
            } = *layer
            {
                for p in [conv_w, conv_b, bn_gamma, bn_beta] {
                    let p = &self.params[p];
                    out.push(NamedTensor::from_float(p.name.clone(), &p.shape, &p.value));
                }
                let b = &self.bn[bn];
                let c = b.running_mean.len();
                out.push(NamedTensor::from_float(
                    format!("{}.running_mean", b.prefix),
                    &[c],
                    &b.running_mean,
                ));
                out.push(NamedTensor::from_float(
                    format!("{}.running_var", b.prefix),
                    &[c],
                    &b.running_var,
                ));
                out.push(NamedTensor::scalar_i64(
                    format!("{}.num_batches_tracked", b.prefix),
                    b.num_batches_tracked,
                ));
            }
        }
        for p in [self.fc_w, self.fc_b] {
            let p = &self.params[p];
            out.push(NamedTensor::from_float(p.name.clone(), &p.shape, &p.value));
        }
        out
    }

    /// PyTorch `load_state_dict`: every model tensor must be present with its exact shape
    /// (floats may be F32 or F64). With `strict`, names the model does not have are an error
    /// too. Nothing is modified unless everything checks out.
    pub fn load_state_dict(
        &mut self,
        tensors: &BTreeMap<String, NamedTensor>,
        strict: bool,
    ) -> Result<(), StateError> {
        fn get<'a>(
            tensors: &'a BTreeMap<String, NamedTensor>,
            name: &str,
            shape: &[usize],
        ) -> Result<&'a NamedTensor, StateError> {
            tensors.get(name).ok_or_else(|| StateError::Missing {
                name: name.to_string(),
                expected: shape.to_vec(),
            })
        }
        let mut values = Vec::with_capacity(self.params.len());
        for p in &self.params {
            values.push(get(tensors, &p.name, &p.shape)?.to_float_vec::<T>(&p.shape)?);
        }
        let mut bn_values = Vec::with_capacity(self.bn.len());
        for b in &self.bn {
            let c = [b.running_mean.len()];
            let rm_name = format!("{}.running_mean", b.prefix);
            let rv_name = format!("{}.running_var", b.prefix);
            let nbt_name = format!("{}.num_batches_tracked", b.prefix);
            let rm = get(tensors, &rm_name, &c)?.to_float_vec::<T>(&c)?;
            let rv = get(tensors, &rv_name, &c)?.to_float_vec::<T>(&c)?;
            let nbt = get(tensors, &nbt_name, &[])?.to_i64_scalar(&[])?;
            bn_values.push((rm, rv, nbt));
        }
        if strict {
            let known: std::collections::HashSet<String> =
                self.state_dict_names().into_iter().collect();
            let unexpected: Vec<String> = tensors
                .keys()
                .filter(|k| !known.contains(*k))
                .cloned()
                .collect();
            if !unexpected.is_empty() {
                return Err(StateError::Unexpected { names: unexpected });
            }
        }
        for (p, v) in self.params.iter_mut().zip(values) {
            p.value = v;
        }
        for (b, (rm, rv, nbt)) in self.bn.iter_mut().zip(bn_values) {
            b.running_mean = rm;
            b.running_var = rv;
            b.num_batches_tracked = nbt;
        }
        Ok(())
    }

    /// The names `state_dict()` produces, in order.
    pub fn state_dict_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for layer in &self.layers {
            if let Layer::ConvBnRelu {
                conv_w,
                conv_b,
                bn_gamma,
                bn_beta,
                bn,
            } = *layer
            {
                for p in [conv_w, conv_b, bn_gamma, bn_beta] {
                    names.push(self.params[p].name.clone());
                }
                for s in ["running_mean", "running_var", "num_batches_tracked"] {
                    names.push(format!("{}.{s}", self.bn[bn].prefix));
                }
            }
        }
        names.push(self.params[self.fc_w].name.clone());
        names.push(self.params[self.fc_b].name.clone());
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vgg11_name_is_its_spec() {
        let spelled = parse_spec(VGG11).unwrap();
        for name in ["vgg11", " VGG11 "] {
            assert_eq!(parse_spec(name).unwrap(), spelled, "{name:?}");
        }
        assert_eq!(
            VggConfig::from_spec("vgg11", 3, 32, 10).unwrap(),
            VggConfig::vgg11()
        );
        assert!(parse_spec("vgg12").is_err());
    }

    #[test]
    fn conv_geoms_name_and_size_every_conv_weight() {
        let config = VggConfig::vgg11();
        let model = Vgg::<f32>::new(config.clone(), 0);
        let geoms = config.conv_geoms(7);
        let weights: Vec<_> = model
            .params()
            .iter()
            .filter(|p| p.shape.len() == 4)
            .collect();
        assert_eq!(geoms.len(), weights.len());
        let mut hw = 32;
        for ((name, g), w) in geoms.iter().zip(&weights) {
            assert_eq!(format!("{name}.weight"), w.name);
            assert_eq!(
                [g.c_out, g.c_in, g.kh, g.kw],
                [w.shape[0], w.shape[1], 3, 3]
            );
            assert_eq!((g.n, g.stride, g.pad, g.out_h()), (7, 1, 1, g.h));
            assert!(g.h <= hw && g.h == g.w, "{name}: {g:?}");
            hw = g.h;
        }
        assert_eq!(geoms.last().map(|(_, g)| g.h), Some(2));
    }

    #[test]
    fn parse_spec_accepts_vgg_lists_and_rejects_junk() {
        assert_eq!(
            parse_spec("8, M ,16,m").unwrap(),
            vec![
                LayerSpec::Conv(8),
                LayerSpec::MaxPool,
                LayerSpec::Conv(16),
                LayerSpec::MaxPool
            ]
        );
        assert!(parse_spec("8,X").is_err());
        assert!(parse_spec("M").is_err());
        assert!(parse_spec("0,M").is_err());
        assert!(parse_spec("").is_err());
        assert!(VggConfig::from_spec("8,M,M", 3, 2, 10).is_err());
    }

    #[test]
    fn vgg11_has_pytorch_parameter_count_and_names() {
        let m = Vgg::<f32>::new(VggConfig::vgg11(), 0);
        assert_eq!(m.params().len(), 34);
        assert_eq!(m.num_params(), 9_231_114);
        let names = m.state_dict_names();
        assert_eq!(
            &names[..7],
            &[
                "layers.0.weight",
                "layers.0.bias",
                "layers.1.weight",
                "layers.1.bias",
                "layers.1.running_mean",
                "layers.1.running_var",
                "layers.1.num_batches_tracked",
            ]
        );
        // Block 2 starts after conv, bn, relu, pool: Sequential index 4.
        assert_eq!(names[7], "layers.4.weight");
        assert_eq!(names[names.len() - 2..], ["fc1.weight", "fc1.bias"]);
        assert_eq!(m.config().fc_in(), 512);
    }

    #[test]
    fn bad_batches_are_errors_not_panics() {
        let mut m = Vgg::<f32>::new(VggConfig::from_spec("4,M", 3, 4, 3).unwrap(), 0);
        let x = vec![0f32; 2 * 3 * 4 * 4];
        let mut hook = |_: usize, _: &[f32]| {};
        assert!(matches!(
            m.forward_backward(&x[1..], 2, &[0, 1], &mut hook),
            Err(ModelError::BadInput { .. })
        ));
        assert!(matches!(
            m.forward_backward(&x, 2, &[0, 3], &mut hook),
            Err(ModelError::BadLabel {
                index: 1,
                label: 3,
                ..
            })
        ));
        assert!(matches!(
            m.forward_backward(&x, 2, &[0], &mut hook),
            Err(ModelError::BadLabelCount { .. })
        ));
        assert!(matches!(
            m.forward_eval(&[], 0),
            Err(ModelError::EmptyBatch)
        ));
    }
}
