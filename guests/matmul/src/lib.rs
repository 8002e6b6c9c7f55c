//! The seed's demonstration as an actor: it fills two 128×128 matrices in its own memory,
//! asks the host's device to multiply them in place, checks every element of the result
//! against its own loop, and emits the error count.
//!
//! Entries are small integers, so every product and partial sum is exact in f32 and any
//! correct device agrees bit for bit, whatever its summation order.

use tern_guest::{Actor, Error, emit_str, export_actor, matmul_f32};

const N: usize = 128;

#[derive(Default)]
struct Matmul;

impl Actor for Matmul {
    fn on_message(&mut self, _message: &[u8]) -> Result<(), Error> {
        let a: Vec<f32> = (0..N * N)
            .map(|i| ((i * 7 + i / N * 3) % 17) as f32 - 8.0)
            .collect();
        let b: Vec<f32> = (0..N * N)
            .map(|i| ((i * 5 + i / N) % 13) as f32 - 6.0)
            .collect();
        let mut c = vec![0.0f32; N * N];
        matmul_f32(&a, &b, &mut c, N, N, N)?;

        let mut errors = 0;
        for i in 0..N {
            for j in 0..N {
                let expect: f32 = (0..N).map(|p| a[i * N + p] * b[p * N + j]).sum();
                if c[i * N + j] != expect {
                    errors += 1;
                }
            }
        }
        let checksum: f64 = c.iter().map(|&x| f64::from(x)).sum();
        emit_str(&format!(
            "matmul {N}x{N}: {errors} errors of {} (checksum {checksum}, C at guest offset {:#x})\n",
            N * N,
            c.as_ptr() as usize
        ))?;
        if errors > 0 {
            return Err(Error::guest(format!("{errors} elements differ")));
        }
        Ok(())
    }
}

export_actor!(Matmul);
