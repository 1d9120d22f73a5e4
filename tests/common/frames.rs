//! Client frames built by hand (RFC 6455 §5.2), for tests that break the
//! rules or stop halfway.

/// The masking key the hand-built client frames use.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The header of a client frame (RFC 6455 §5.2): `first` is the byte of
/// FIN, RSV bits and opcode; `len` the payload length it declares, whether
/// or not that much follows; then [`MASK`] when `masked`.
pub fn frame_header(first: u8, len: usize, masked: bool) -> Vec<u8> {
    let mut bytes = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    if len < 126 {
        bytes.push(mask_bit | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        bytes.push(mask_bit | 126);
        bytes.extend_from_slice(&len.to_be_bytes());
    } else {
        bytes.push(mask_bit | 127);
        bytes.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        bytes.extend_from_slice(&MASK);
    }
    bytes
}

/// `payload` masked with [`MASK`], from its first byte.
pub fn masked(payload: &[u8]) -> impl Iterator<Item = u8> + '_ {
    payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4])
}

/// A whole client frame: [`frame_header`], then the payload, masked when
/// `masked`.
pub fn client_frame(first: u8, payload: &[u8], masked_payload: bool) -> Vec<u8> {
    let mut bytes = frame_header(first, payload.len(), masked_payload);
    if masked_payload {
        bytes.extend(masked(payload));
    } else {
        bytes.extend_from_slice(payload);
    }
    bytes
}
