import NIOCore

/// Drives arbitrary bytes through everything a server does with a client's bytes: the
/// decoder, the server handshake machine and the session machine. Used by the libFuzzer
/// target (FuzzTesting/) and by the test that replays its corpus. Must never crash or hang,
/// whatever the input; returns how many elements were decoded.
public enum _FuzzHarness {
    @discardableResult
    public static func run(_ bytes: UnsafeRawBufferPointer) -> Int {
        var buffer = ByteBuffer(bytes: bytes)
        var decoder = WireDecoder(maxFrameSize: 1 << 20)
        var ident = Parley_V1_ServerIdent()
        ident.version = "1.0.0"
        var handshake = ServerHandshakeStateMachine(configuration: .init(
            banner: Banner(supported: .implemented), maxFrameSize: 1 << 20, ident: ident,
            minimumClientVersion: "0.0.5", clientAddress: "fuzz"
        ))
        _ = handshake.start()
        var session: SessionStateMachine?
        var decoded = 0
        do {
            while let element = try decoder.decodeLast(buffer: &buffer, seenEOF: true) {
                decoded += 1
                if var s = session {
                    let event = s.received(element)
                    session = s
                    if case .violation = event { break }
                    if case .peerClosed = event { break }
                } else {
                    let step = handshake.received(element)
                    switch step.outcome {
                    case .established(let r)?: session = SessionStateMachine(role: .server, features: r.features)
                    case .failed?: return decoded
                    case nil: break
                    }
                }
            }
        } catch {}
        return decoded
    }
}
