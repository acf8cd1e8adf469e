import Foundation

/// The built `parley` executable: next to the test bundle, or in the package's .build/debug.
/// `filePath` is the caller's `#filePath` (a file two folders below the package root).
public func parleyExecutablePath(filePath: String = #filePath) -> String? {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("parley").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    let fallback = URL(fileURLWithPath: filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent(".build/debug/parley").path
    return FileManager.default.isExecutableFile(atPath: fallback) ? fallback : nil
}
