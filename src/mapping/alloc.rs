//! The block allocator (filled in with the image engine).
