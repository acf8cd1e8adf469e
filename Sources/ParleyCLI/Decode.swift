import ArgumentParser
import Foundation
import NIOCore
import ParleyServices
import ParleyWire
import SwiftProtobuf

struct Decode: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Decode the bytes of one direction of a Parley connection.",
        discussion: """
            Reads a capture (from FILE, or standard input when FILE is omitted or "-"): the
            banner, then frames, as one side sent them. `parley ping --capture-in F
            --capture-out G` records both directions of a real session. Prints each banner,
            frame and message in readable form, or as JSON Lines with --json. Payloads of
            known types are shown as protobuf JSON; others as hex. Stops at the first bad
            byte and names it; exits 1 then.
            """
    )

    @Argument(help: "Capture file; omit or use - for standard input.")
    var file: String?

    @Flag(name: .long, help: "One JSON object per line instead of text.")
    var json = false

    @Flag(name: .long, help: "The capture starts with a frame, not a banner.")
    var noBanner = false

    @Option(name: .long, help: "Largest frame accepted, in bytes.")
    var maxFrameSize: Int = Frame.defaultMaxFrameSize

    func run() async throws {
        let data: Data
        if let file = self.file, file != "-" {
            guard let d = FileManager.default.contents(atPath: file) else {
                throw ValidationError("cannot read \(file)")
            }
            data = d
        } else {
            do {
                data = try FileHandle.standardInput.readToEnd() ?? Data()
            } catch {
                throw ValidationError("cannot read standard input: \(error.localizedDescription)")
            }
        }
        var buffer = ByteBuffer(bytes: data)
        var decoder = WireDecoder(maxFrameSize: self.maxFrameSize, expectBanner: !self.noBanner)
        var index = 0
        // Secure mode seals everything after the switch (docs/protocol.md 5.1): AUTH_DONE in
        // secure mode (server's bytes), AUTH_REQUEST_MORE after an AUTH_REQUEST offering it
        // (client's bytes). What follows cannot be decoded without the keys.
        var secureOffered = false
        var sealedFromHere = false
        while true {
            let offset = buffer.readerIndex
            do {
                guard let element = try decoder.decodeLast(buffer: &buffer, seenEOF: true) else { break }
                index += 1
                self.emit(Describe.element(element, index: index, offset: offset))
                if case .frame(let frame) = element {
                    switch frame.tag {
                    case .authRequest:
                        secureOffered = (try? Parley_V1_AuthRequest(parleyPayload: frame.segments[0]))?.offeredModes.contains("secure") ?? false
                    case .authRequestMore:
                        sealedFromHere = secureOffered
                    case .authDone:
                        sealedFromHere = (try? Parley_V1_AuthDone(parleyPayload: frame.segments[0]))?.connectionMode == "secure"
                    default:
                        break
                    }
                }
            } catch {
                if sealedFromHere, error.code == .badPreambleCRC {
                    self.emit(["offset": .number(UInt64(offset)), "sealed": .string("\(data.count - offset) bytes sealed in secure mode (not decodable without the keys)")])
                    return
                }
                self.emit(["error": .string("\(error.code): \(error.message)"), "offset": .number(UInt64(offset))])
                throw ExitCode(1)
            }
        }
    }

    func emit(_ object: [String: Describe.Value]) {
        if self.json {
            print(Describe.json(object))
        } else {
            print(Describe.text(object))
        }
    }
}

/// Turns wire elements into ordered key/value records for text or JSON output.
enum Describe {
    enum Value {
        case string(String)
        /// An integer: printed exactly, whatever its size (ids, seq, ack and timestamps are u64).
        case number(UInt64)
        case raw(String)  // already JSON
    }

    static let messageTypes: [String: any SwiftProtobuf.Message.Type] = {
        let types: [any SwiftProtobuf.Message.Type] = [
            Parley_V1_Status.self, Parley_Echo_V1_Echo.self, Parley_Echo_V1_EchoReply.self, Parley_Echo_V1_Ping.self,
            Parley_Echo_V1_Pong.self, Parley_Echo_V1_Count.self, Parley_Echo_V1_CountItem.self, Parley_Echo_V1_CountDone.self,
            Parley_Echo_V1_Sleep.self, Parley_Echo_V1_Slept.self,
        ]
        return Dictionary(uniqueKeysWithValues: types.map { ($0.protoMessageName, $0) })
    }()

    static let frameTypes: [UInt8: any SwiftProtobuf.Message.Type] = [
        FrameTag.hello.rawValue: Parley_V1_Hello.self, FrameTag.authRequest.rawValue: Parley_V1_AuthRequest.self,
        FrameTag.authBadMethod.rawValue: Parley_V1_AuthBadMethod.self, FrameTag.authReplyMore.rawValue: Parley_V1_AuthMore.self,
        FrameTag.authRequestMore.rawValue: Parley_V1_AuthMore.self, FrameTag.authDone.rawValue: Parley_V1_AuthDone.self,
        FrameTag.clientIdent.rawValue: Parley_V1_ClientIdent.self, FrameTag.serverIdent.rawValue: Parley_V1_ServerIdent.self,
        FrameTag.notice.rawValue: Parley_V1_Notice.self, FrameTag.close.rawValue: Parley_V1_Status.self,
    ]

    static func payloadJSON(_ type: (any SwiftProtobuf.Message.Type)?, _ buffer: ByteBuffer) -> Value {
        guard let type, let message = try? type.init(serializedBytes: Array(buffer.readableBytesView)),
              let json = try? message.jsonString() else {
            return .string("hex:" + Array(buffer.readableBytesView.prefix(256)).hexString + (buffer.readableBytes > 256 ? " ..." : ""))
        }
        return .raw(json)
    }

    static func element(_ element: WireInbound, index: Int, offset: Int) -> [String: Value] {
        switch element {
        case .banner(let b):
            return [
                "#": .number(UInt64(index)), "offset": .number(UInt64(offset)), "element": .string("banner"),
                "version": .number(UInt64(b.version)), "supported": .string(b.supported.description), "required": .string(b.required.description),
            ]
        case .frame(let f):
            var out: [String: Value] = [
                "#": .number(UInt64(index)), "offset": .number(UInt64(offset)), "element": .string("frame"),
                "tag": .string(f.tag.description), "flags": .number(UInt64(f.flags)),
                "segments": .string(f.segments.map { "\($0.readableBytes)" }.joined(separator: ",")),
            ]
            switch f.tag {
            case .message:
                guard let m = try? WireMessage(frame: f) else {
                    out["payload"] = .string("unreadable message header")
                    return out
                }
                out["seq"] = .number(UInt64(m.header.seq))
                out["ack"] = .number(UInt64(m.header.ack))
                out["id"] = .number(UInt64(m.header.id))
                out["kind"] = .string(m.header.kind.description)
                out["type"] = .string(m.header.type)
                if m.header.kind != .cancel { out["payload"] = self.payloadJSON(self.messageTypes[m.header.type], m.payload) }
                if let d = m.data { out["data"] = .string("\(d.readableBytes) bytes") }
            case .keepalive, .keepaliveAck:
                let stamp = f.segments[0].getInteger(at: f.segments[0].readerIndex, endianness: .little, as: UInt64.self) ?? 0
                out["timestamp"] = .number(UInt64(stamp))
            case .direct:
                // The id, then the service's header as bytes: which service enabled DIRECT on
                // the connection is not in the capture (docs/protocol.md 7.16).
                var s0 = f.segments[0]
                if let id = s0.readInteger(endianness: .little, as: UInt64.self) {
                    out["id"] = .number(id)
                    out["payload"] = .string(s0.readableBytesView.map { String(format: "%02x", $0) }.joined(separator: " "))
                } else {
                    out["payload"] = .string("segment 0 too short for the direct id")
                }
                if f.segments.count > 1 { out["data"] = .string("\(f.segments[1].readableBytes) bytes") }
            default:
                out["payload"] = self.payloadJSON(self.frameTypes[f.tag.rawValue], f.segments[0])
            }
            return out
        }
    }

    static let order = ["#", "offset", "element", "tag", "version", "supported", "required", "flags", "segments", "seq", "ack", "id", "kind", "type", "timestamp", "payload", "data", "sealed", "error"]

    static func sortedKeys(_ o: [String: Value]) -> [String] {
        o.keys.sorted { (order.firstIndex(of: $0) ?? 99, $0) < (order.firstIndex(of: $1) ?? 99, $1) }
    }

    static func text(_ o: [String: Value]) -> String {
        sortedKeys(o).map { key in
            switch o[key]! {
            case .string(let s): return "\(key)=\(s.contains(" ") ? "\"\(s)\"" : s)"
            case .number(let n): return "\(key)=\(n)"
            case .raw(let j): return "\(key)=\(j)"
            }
        }.joined(separator: " ")
    }

    static func json(_ o: [String: Value]) -> String {
        "{" + sortedKeys(o).map { key in
            let v: String
            switch o[key]! {
            case .string(let s): v = quote(s)
            case .number(let n): v = "\(n)"
            case .raw(let j): v = j
            }
            return quote(key) + ":" + v
        }.joined(separator: ",") + "}"
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if c.value < 0x20 { out += String(format: "\\u%04x", c.value) } else { out.unicodeScalars.append(c) }
            }
        }
        return out + "\""
    }
}
