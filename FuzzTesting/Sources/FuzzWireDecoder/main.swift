import ParleyWire

/// An input starting with `S` goes to the secure-mode harness (`_FuzzHarness.runSecure`),
/// any other to the crc-mode one (`_FuzzHarness.run`): see `_FuzzHarness.runAny`.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWireDecoder(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    _FuzzHarness.runAny(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}
