//! The forward pass's compute pipelines, built from [`super::shaders`] for the matrix types a
//! model uses, and [`Dispatch`]: one kernel with its buffers and parameters bound, recorded
//! into a compute pass as often as needed.

use tern_compute::wgpu::wgpu;
use tern_compute::wgpu::{WgpuDevice, compute_pipeline};

use super::shaders::{self, Reduce};
use crate::ModelError;
use crate::quant::DType;

/// Every pipeline of the forward pass.
pub struct Kernels {
    /// By weight type and token capacity (`shaders::MATVEC_TOKENS`).
    matvec: Vec<((DType, u32), wgpu::ComputePipeline)>,
    get_rows: Vec<(DType, wgpu::ComputePipeline)>,
    pub rmsnorm: wgpu::ComputePipeline,
    pub attn_split: wgpu::ComputePipeline,
    pub attn_merge: wgpu::ComputePipeline,
    pub swiglu: wgpu::ComputePipeline,
    /// How matrix rows are summed on this adapter.
    pub reduce: Reduce,
}

impl Kernels {
    /// Builds the pipelines; matrix kernels for `matrix_types`, embedding lookups for
    /// `embd_types`; rows summed as `reduce` says, or as suits the adapter; the attention
    /// over a KV cache of f16 values (`kv_f16`) or of f32 ones.
    pub fn build(
        gpu: &WgpuDevice,
        matrix_types: &[DType],
        embd_types: &[DType],
        reduce: Option<Reduce>,
        kv_f16: bool,
    ) -> Kernels {
        let device = gpu.device();
        let reduce = reduce.unwrap_or_else(|| Kernels::reduce_for(gpu));
        let plain = |name: &str| {
            let src = shaders::plain(name).expect("every plain kernel has a module");
            compute_pipeline(device, name, &src)
        };
        Kernels {
            matvec: matrix_types
                .iter()
                .flat_map(|&t| shaders::MATVEC_TOKENS.map(|n| (t, n)))
                .map(|(t, n)| {
                    let src = shaders::matvec(t, reduce, n);
                    ((t, n), compute_pipeline(device, "matvec", &src))
                })
                .collect(),
            get_rows: embd_types
                .iter()
                .map(|&t| {
                    (
                        t,
                        compute_pipeline(device, "get_rows", &shaders::get_rows(t)),
                    )
                })
                .collect(),
            rmsnorm: plain("rmsnorm"),
            attn_split: compute_pipeline(device, "attn_split", &shaders::attn_split(kv_f16)),
            attn_merge: plain("attn_merge"),
            swiglu: plain("swiglu"),
            reduce,
        }
    }

    /// Subgroup reductions where the adapter has them with subgroups of 2..=32 invocations.
    pub fn reduce_for(gpu: &WgpuDevice) -> Reduce {
        let info = gpu.adapter_info();
        let sizes = info.subgroup_min_size..=info.subgroup_max_size;
        if gpu.device().features().contains(wgpu::Features::SUBGROUP)
            && *sizes.start() >= 2
            && *sizes.end() <= 32
        {
            Reduce::Subgroup
        } else {
            Reduce::Shared
        }
    }

    /// `matvec` for weights of type `t` and calls of at most `max_tok` tokens (one of
    /// `shaders::MATVEC_TOKENS`).
    pub fn matvec(&self, t: DType, max_tok: u32) -> Result<&wgpu::ComputePipeline, ModelError> {
        find(&self.matvec, (t, max_tok), || {
            format!("matvec for {t} x {max_tok}")
        })
    }

    pub fn get_rows(&self, t: DType) -> Result<&wgpu::ComputePipeline, ModelError> {
        find(&self.get_rows, t, || format!("get_rows for {t}"))
    }
}

/// The pipeline built for `key` (`what` names it in the error when none was).
fn find<K: PartialEq>(
    list: &[(K, wgpu::ComputePipeline)],
    key: K,
    what: impl FnOnce() -> String,
) -> Result<&wgpu::ComputePipeline, ModelError> {
    list.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, p)| p)
        .ok_or_else(|| ModelError::Invalid(format!("wgpu: no {} kernel built", what())))
}

/// A buffer range a kernel binds: a whole buffer, or a window of one (guest memory).
#[derive(Clone, Copy)]
pub struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: Option<u64>,
}

impl<'a> Bind<'a> {
    pub fn all(buffer: &'a wgpu::Buffer) -> Bind<'a> {
        Bind {
            buffer,
            offset: 0,
            size: None,
        }
    }
}

/// One kernel launch, ready to record: its name, pipeline, bind group and grid.
pub struct Dispatch {
    pub name: &'static str,
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    grid: [u32; 3],
}

impl Dispatch {
    /// Binds `buffers` at bindings `0..` and the parameter words (a uniform buffer, padded
    /// to 16 bytes) after them.
    pub fn new(
        gpu: &WgpuDevice,
        name: &'static str,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[Bind<'_>],
        params: &[u32],
        grid: [u32; 3],
    ) -> Dispatch {
        let mut words = params.to_vec();
        words.resize(params.len().next_multiple_of(4).max(4), 0);
        let uniform = gpu.uniform(&words);
        let mut entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .zip(0..)
            .map(|(b, binding)| wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: b.size.and_then(wgpu::BufferSize::new),
                }),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: buffers.len() as u32,
            resource: uniform.as_entire_binding(),
        });
        let group = gpu.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(name),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Dispatch {
            name,
            pipeline: pipeline.clone(),
            group,
            grid,
        }
    }

    /// The launch under another name (in a per-kernel breakdown).
    pub fn named(self, name: &'static str) -> Dispatch {
        Dispatch { name, ..self }
    }

    /// Records the launch into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.group, &[]);
        pass.dispatch_workgroups(self.grid[0], self.grid[1], self.grid[2]);
    }
}

/// Records `dispatches` and submits them in growing parts (8 launches, then 16, 32, ...), so
/// that the GPU runs the first while the host records the rest: recording a launch costs
/// the host microseconds, which one submission of a whole step would add to its time.
pub fn submit(gpu: &WgpuDevice, dispatches: &[&Dispatch]) {
    let mut rest = dispatches;
    let mut part = 8;
    while !rest.is_empty() {
        let (now, later) = rest.split_at(part.min(rest.len()));
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for d in now {
                d.record(&mut pass);
            }
        }
        gpu.queue().submit([encoder.finish()]);
        rest = later;
        part *= 2;
    }
}
