//! The Llama forward pass on a GPU through wgpu (Vulkan; Metal on macOS).

pub mod shaders;
